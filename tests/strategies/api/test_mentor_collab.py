import asyncio
import re

import pytest
from pydantic import ValidationError

from moco_ray.strategies.api.mentor_collab import JUDGE, MentorCollab, first_word


def partial(call) -> str:
    return re.split(r"Question \w+", call.text, maxsplit=1)[1]


# (model, kind, answer so far) -> what the model writes; kinds by the call's max_tokens:
# word (11 tokens), patch (16) and the judgement (1 token, after the judge prompt).
SCRIPT = {
    ("mentee", "word", ""): " The cat",
    ("mentor", "word", ""): " The dog",            # same first word: no patches
    ("mentee", "word", " The"): " cat sat",
    ("mentor", "word", " The"): " dog ran",        # differs: both write a patch
    ("mentee", "patch", " The"): " cat sat down",
    ("mentor", "patch", " The"): " dog ran off",
    ("mentee", "word", " The cat"): "",            # alone, the mentee would end here
    ("mentee", "word", " The dog ran off"): "",    # EOS
    ("mentor", "word", " The dog ran off"): ".",
    ("mentee", "patch", " The dog ran off"): "",
    ("mentor", "patch", " The dog ran off"): ". The end",
    ("mentee", "word", " The dog ran off. The end"): "",
    ("mentor", "word", " The dog ran off. The end"): "",  # both end: same (empty) word
    ("mentee", "word", " The cat sat down"): "",
    ("mentor", "word", " The cat sat down"): "",
}


def scripted(judgement):
    def respond(call):
        text = partial(call)
        if "My choice: Option (" in text:
            return judgement
        kind = {11: "word", 16: "patch"}[call.params.max_tokens]
        return SCRIPT[(call.model, kind, text)]
    return respond


def solve(toy, params, judgement="B"):
    ctx, pool = toy(["mentee", "mentor"], scripted(judgement))
    ex = ctx.task.test.examples[0]
    return asyncio.run(MentorCollab(params).solve(ctx.example(ex), ex)), pool


def test_mentor_patch_is_adopted_when_the_mentee_judges_it_better(toy):
    ans, pool = solve(toy, {"decision_proportion": 100, "max_tokens": 40})
    # step 1: same word " The"; step 2: words differ, the judge says B -> the mentor's patch;
    # step 3: the mentee would end, the mentor goes on, B again -> ". The end"; step 4: both end
    assert ans.output == " The dog ran off. The end"
    assert (ans.meta["consults"], ans.meta["disagreements"], ans.meta["mentor_patches"]) == \
        (4, 2, 2)
    judges = [c for c in pool.calls if "My choice" in c.text]
    assert judges[0].model == "mentee" and judges[0].params.max_tokens == 1
    assert judges[0].text.endswith(" The" + JUDGE.format(mine=" cat sat down",
                                                         mentor=" dog ran off"))
    for c in pool.calls:  # the reference decodes greedily; raw continuations
        assert c.params.temperature == 0.0 and isinstance(c.prompt, str)


def test_mentees_own_patch_when_it_judges_a_or_anything_else(toy):
    for judgement in ("A", "maybe"):
        ans, _ = solve(toy, {"decision_proportion": 100}, judgement)
        # step 2 keeps the mentee's own patch, then both end
        assert ans.output == " The cat sat down"
        assert ans.meta["mentor_patches"] == 0


def test_without_consulting_the_mentor_is_never_asked(toy):
    ans, pool = solve(toy, {"decision_proportion": 0})
    assert ans.output == " The cat"  # word by word until the mentee's EOS
    assert pool.of("mentor") == [] and ans.meta["consults"] == 0
    assert [c.params.max_tokens for c in pool.calls] == [11, 11, 11]


def test_consult_rate_follows_decision_proportion(toy):
    def endless(call):
        if "My choice" in call.text:
            return "A"
        return " x y" if call.model == "mentee" else " x z"

    ctx, pool = toy(["mentee", "mentor"], endless, n_test=1)
    ex = ctx.task.test.examples[0]
    ans = asyncio.run(MentorCollab({"decision_proportion": 25, "max_tokens": 400})
                      .solve(ctx.example(ex), ex))
    # words cost one token each here, and the mentor never differs: consults ~ 25% of steps
    steps = len(pool.of("mentee"))
    assert steps == 400 and 60 <= ans.meta["consults"] <= 140
    assert ans.meta["disagreements"] == 0


def test_first_word_and_roles():
    assert first_word(" The cat") == " The"
    assert first_word("\nThe cat") == "\nThe"
    assert first_word("cat.\nNext") == "cat."
    assert first_word("   ") == "   " and first_word("") == ""
    with pytest.raises(ValidationError, match="pick two models"):
        MentorCollab({"mentee": "a", "mentor": "a"})


def test_bad_roles_raise(toy):
    ctx, _ = toy(["a", "b"], lambda c: "x")
    with pytest.raises(ValueError, match="not among this job's models"):
        asyncio.run(MentorCollab({"mentor": "zzz"}).fit_checked(ctx, ctx.task.dev))
    ctx1, _ = toy(["a"], lambda c: "x")
    with pytest.raises(ValueError, match="needs 2 models"):
        asyncio.run(MentorCollab().fit_checked(ctx1, ctx1.task.dev))
