import asyncio
import re

import pytest
from pydantic import ValidationError

from moco_ray.strategies.text import _bbmas_prompts as P
from moco_ray.strategies.text.bbmas import Blackboard

MODELS = ["a", "b", "c"]
PHRASE = {"propose": P.PROPOSE, "step": P.EXECUTE_STEP, "critique": P.CRITIQUE,
          "terminate": P.TERMINATE}


def entries(text):
    return [int(i) for i in re.findall(r"^Entry #(\d+) \(", text, flags=re.MULTILINE)]


def bb_pool(toy, choose, vote=lambda m: "", control="Agent 3", good="b", **kw):
    """choose(model, entries on the board, attempt) -> 'propose' | ... | 'terminate' | junk."""
    attempts: dict = {}

    def respond(call):
        t = call.text
        if call.qid.startswith("d") and "Blackboard:" not in t:
            return f"Answer: {'7' if call.model == good else '0'}"
        if "I vote for Conclusion #<number>" in t:
            return vote(call.model)
        if "Choose the" in t and "agent(s) who should write" in t:
            return control
        if "Decide how you can best contribute now" in t:
            key = (call.model, call.qid, len(entries(t)))
            attempts[key] = attempts.get(key, 0) + 1
            act = choose(call.model, len(entries(t)), attempts[key])
            return f"Thinking. I choose to {PHRASE[act]}." if act in PHRASE else act
        if "Read the blackboard and give the final answer" in t:
            return f"decided by {call.model} Answer: 7"
        action = re.search(r"You chose to (.+?)\. Your reasoning", t).group(1)
        if action == P.TERMINATE:
            return f"FINAL: {call.model} concludes Answer: {MODELS.index(call.model)}"
        return f"{call.model} does {action}"

    return toy(MODELS, respond, **kw)


def solve(toy, params, choose, i=0, **kw):
    ctx, pool = bb_pool(toy, choose, **kw)
    strat = Blackboard(params)
    asyncio.run(strat.fit_checked(ctx, ctx.task.dev))
    pool.calls.clear()
    ex = ctx.task.test.examples[i]
    return asyncio.run(strat.solve(ctx.example(ex), ex)), pool


def propose_then_terminate(model, n, attempt):
    return "propose" if n < 3 else "terminate"


def test_one_random_agent_per_iteration_reads_the_whole_board_until_one_terminates(toy):
    actors = []
    for i in range(4):
        ans, pool = solve(toy, {}, propose_then_terminate, i=i, n_test=4)
        board = ans.meta["board"]
        assert [e["iteration"] for e in board] == [1, 2, 3, 4]  # stops at the first terminate
        assert [len(a) for a in ans.meta["acting"]] == [1, 1, 1, 1]
        selects = [c for c in pool.calls if "Decide how you can best" in c.text]
        assert [entries(c.text) for c in selects] == [[], [1], [1, 2], [1, 2, 3]]
        for c, e in zip(selects, board):
            assert c.model == MODELS[e["agent"]] and f"You are Agent {e['agent'] + 1}." in c.text
        # each turn: choose, then carry out, by the same model; board entries keep both
        assert len(pool.calls) == 8 and [c.model for c in pool.calls[::2]] == \
            [c.model for c in pool.calls[1::2]]
        assert f"{MODELS[board[0]['agent']]} does {P.PROPOSE}" in board[0]["text"]
        last = MODELS[board[-1]["agent"]]
        assert ans.output == f"{last} concludes Answer: {MODELS.index(last)}"
        assert pool.calls[-1].prompt[0]["role"] == "system"  # the final solution keeps format
        actors.append(tuple(e["agent"] for e in board))
    assert len({a for t in actors for a in t}) == 3  # the control step draws at random


def test_iteration_cap_and_conclusions_from_the_last_iteration(toy):
    ans, _ = solve(toy, {"max_iterations": 2}, lambda m, n, a: "critique")
    assert len(ans.meta["board"]) == 2 and ans.meta["conclusions"] == [ans.meta["board"][1]["text"]]
    assert ans.output == ans.meta["board"][1]["text"]


def test_unparseable_action_choices_are_retried_then_invalid(toy):
    def junk_first(model, n, attempt):
        return "no idea" if attempt == 1 else "terminate"

    ans, pool = solve(toy, {}, junk_first)
    assert len([c for c in pool.calls if "Decide how" in c.text]) == 2
    assert re.fullmatch(r"[abc] concludes Answer: \d", ans.output)
    # two actions named at once is no choice either; greedy decoding gets one try only
    both = f"I choose to {P.PROPOSE}. I choose to {P.TERMINATE}."
    ans, pool = solve(toy, {"temperature": 0.0, "max_iterations": 1}, lambda m, n, a: both)
    assert ans.meta["board"][0]["text"] == "INVALID ACTION"
    # ...and never the answer: with no action named, a model concludes from the board.
    assert len(pool.calls) == 2 and pool.calls[-1].model == "a"  # the job's first model
    assert ans.output == "decided by a Answer: 7" and ans.meta["concluded_by"] == "a"
    assert ans.meta["conclusions"] == [] and "Read the blackboard" in pool.calls[-1].text


def test_invalid_turns_stay_off_the_board_agents_read_and_case_does_not_matter(toy):
    def junk_then_shout(model, n, attempt):
        # The first turn names no action; later ones name it in capitals.
        return "no idea" if n == 0 and not seen else f"I CHOOSE TO {P.TERMINATE.upper()}."

    seen: list = []

    def choose(model, n, attempt):
        out = junk_then_shout(model, n, attempt)
        seen.append(n)
        return out

    ans, pool = solve(toy, {"temperature": 0.0, "max_iterations": 3}, choose)
    board = ans.meta["board"]
    assert board[0]["text"] == "INVALID ACTION" and len(board) == 2
    second = [c for c in pool.calls if "Decide how you can best" in c.text][1]
    assert "INVALID ACTION" not in second.text and "The blackboard is empty." in second.text
    assert re.fullmatch(r"[abc] concludes Answer: \d", ans.output)


def test_agents_vote_when_several_final_solutions_compete(toy):
    votes = {"a": "Therefore, I vote for Conclusion #2.", "b": "Conclusion #2 it is",
             "c": "Therefore, I vote for Conclusion #1."}
    ans, pool = solve(toy, {"agents_per_iteration": 3}, lambda m, n, a: "terminate",
                      vote=votes.get)
    assert sorted(e["agent"] for e in ans.meta["board"]) == [0, 1, 2]
    assert len(ans.meta["conclusions"]) == 3 and ans.meta["votes"] == [2, 2, 1]
    assert ans.output == ans.meta["conclusions"][1]
    ballots = [c for c in pool.calls if "I vote for" in c.text]
    assert sorted(c.model for c in ballots) == MODELS and "Entry #3" in ballots[0].text
    # unparseable or out-of-range votes do not count; a tie goes to the lower number
    votes = {"a": "Conclusion #9", "b": "Conclusion #3", "c": "Conclusion #2"}
    ans, _ = solve(toy, {"agents_per_iteration": 3}, lambda m, n, a: "terminate",
                   vote=votes.get)
    assert ans.meta["votes"] == [None, 3, 2] and ans.output == ans.meta["conclusions"][1]


def test_llm_control_and_dev_best_decider(toy):
    ans, pool = solve(toy, {"control": "llm", "decider": "dev_best"}, propose_then_terminate)
    assert [e["agent"] for e in ans.meta["board"]] == [2, 2, 2, 2]  # the controller named c
    control = [c for c in pool.calls if "who should write" in c.text]
    assert {c.model for c in control} == {"b"} and entries(control[-1].text) == [1, 2, 3]
    [decide] = [c for c in pool.calls if "Read the blackboard" in c.text]
    assert decide.model == "b" and entries(decide.text) == [1, 2, 3, 4]
    assert ans.output == "decided by b Answer: 7"
    # an unclear controller answer falls back to a seeded random agent
    ans, _ = solve(toy, {"control": "llm", "max_iterations": 3}, lambda m, n, a: "step",
                   control="anyone")
    assert all(len(a) == 1 for a in ans.meta["acting"])


def test_agents_can_all_run_on_the_dev_best_model_and_bad_settings_raise(toy):
    _, pool = solve(toy, {"agent_models": "dev_best"}, propose_then_terminate, good="c")
    assert {c.model for c in pool.calls} == {"c"}
    with pytest.raises(RuntimeError, match="needs fit"):
        ctx, _ = bb_pool(toy, propose_then_terminate)
        ex = ctx.task.test.examples[0]
        asyncio.run(Blackboard({"decider": "dev_best"}).solve(ctx.example(ex), ex))
    with pytest.raises(ValidationError, match="could never stop early"):
        Blackboard({"min_agents_to_stop": 2})
