"""The single-multi evolution loop: the loop (loop.py), its stages (stages.py), the run
directory's manifest (manifest.py) and the SFT rows distilled from collaboration (sft_data.py)."""
