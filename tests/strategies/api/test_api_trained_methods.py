"""Logic of the API-level methods that train (trained router, Co-LLM, Switch Generation) on a
scripted pool: the labels they build on dev, what they train, and how they decode with the
adapter. Training itself is stood in for (monkeypatched `train_adapters`); the real trainer and
real adapters run in test_api_trained_pool.py."""
from __future__ import annotations

import asyncio
import re

import pytest
import scripted
from pydantic import ValidationError

from moco_ray.models import zoo
from moco_ray.models.tokenizer import encode_continuation, encode_prompt, render_prompt
from moco_ray.records import Generation, Score
from moco_ray.strategies import training
from moco_ray.strategies.api.collm import CoLLM, follows
from moco_ray.strategies.api.switch_generation import SwitchGeneration
from moco_ray.strategies.api.trained_router import TrainedRouter
from moco_ray.strategies.base import StrategyContext
from moco_ray.tasks.base import DevSplit, Example, Task, TestSplit
from moco_ray.training.data import IGNORE, segments, tokenize_row


def lora_pool_class(base):
    """The scripted pool plus what training methods use: the adapter of each request (seen by
    `respond` as call.lora and by the scorer as a 4th argument) and weights_path."""

    class LoraPool(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scored_prompts = []  # every scored prompt as sent (chat messages or raw text)

        async def generate(self, model, prompts, params, lora=None):
            await asyncio.sleep(0)
            mod = scripted
            out = []
            for p in prompts:
                call = mod.Call(model, p, mod.text_of(p), params)
                call.lora = lora
                out.append(self._gen(call))
            return out

        async def score(self, model, prompt, continuations, lora=None):
            await asyncio.sleep(0)
            text = scripted.text_of(prompt)
            self.scored.append((model, text, list(continuations), lora))
            self.scored_prompts.append(prompt)
            sums = [self.scorer(model, text, c, lora) for c in continuations]
            return [Score(sum_logprob=s, mean_logprob=s, num_tokens=1) for s in sums]

        async def weights_path(self, model):
            return f"/weights/{model}"

        def render(self, model, prompt):  # "|" ends the prompt, so `written` finds the answer
            return scripted.text_of(prompt) + "|"

    return LoraPool


@pytest.fixture
def lora_toy(toy):
    """lora_toy(models, respond, scorer=None, task=None, **toy kwargs) -> (ctx, pool)."""

    def build(models, respond, scorer=None, task=None, **kw):
        ctx, plain = toy(models, respond, **kw)
        pool = lora_pool_class(type(plain))(models, respond, scorer)
        return StrategyContext(pool, task or ctx.task, models, seed=kw.get("seed", 0)), pool

    return build


@pytest.fixture
def trained(monkeypatch):
    """Stands in for training: records every call, returns /adapters/<name> per adapter."""
    seen = []

    async def fake(ctx, jobs, cfg=None):
        seen.append({"jobs": jobs, "cfg": cfg})
        return {name: f"/adapters/{name}" for name in jobs}

    monkeypatch.setattr(training, "train_adapters", fake)
    return seen


def gen(text: str, tokens: int | None = None, end: bool = False) -> Generation:
    n = len(text.split()) if tokens is None else tokens
    return Generation(text=text, token_ids=[1] * n, finish_reason="stop" if end else "length",
                      prompt_tokens=1, completion_tokens=n)


def written(call) -> str:
    """The answer so far that a continuation call carries after its rendered prompt."""
    return call.text.split("|", 1)[1] if isinstance(call.prompt, str) else ""


def word_task(answer: str, n_dev: int = 2, n_test: int = 2, max_tokens: int = 16) -> Task:
    """Questions 'Question dK' whose reference `answer` the metric accepts as an output."""
    def rows(prefix, n):
        return tuple(Example(id=f"{prefix}{i}", question=f"Question {prefix}{i}",
                             reference=answer) for i in range(n))

    return Task(name="words", kind="exact_match", dev=DevSplit(task="words", examples=rows("d", n_dev)),
                test=TestSplit(task="words", examples=rows("t", n_test)),
                format=lambda ex: [{"role": "user", "content": ex.question}],
                extract=lambda out, ex: out.strip(),
                metric=lambda ans, ex: float(ans == ex.reference), max_tokens=max_tokens)


def run(coro):
    return asyncio.run(coro)


def solve_all(strat, ctx, examples):
    return {ex.id: run(strat.solve(ctx.example(ex), ex)) for ex in examples}


# --- trained router -----------------------------------------------------------------------------

TOPICS = ["alpha", "beta", "gamma"]


def topic_of(qid: str) -> str:
    return TOPICS[int(qid[1:]) % 3]


def expert_respond(call):
    """m<k> is right on topic k; on d-questions 'd6'+ every model is right (a tie)."""
    k = TOPICS.index(next(t for t in TOPICS if t in call.text))
    everyone = call.qid.startswith("d") and int(call.qid[1:]) >= 6
    right = everyone or call.model == f"m{k}"
    return f"Answer: {'7' if right else '0'} from {call.model}"


def router_scorer(model, text, cont, lora):
    assert lora == "/adapters/router", "the router scores labels with its trained adapter"
    k = next(i for i, t in enumerate(TOPICS) if t in text)
    return 0.0 if cont == f"Model {k + 1}" else -5.0


def test_router_labels_are_the_argmax_of_dev_scores_and_route_test(lora_toy, trained):
    ctx, pool = lora_toy(["m0", "m1", "m2"], expert_respond, router_scorer, n_dev=8, n_test=3,
                         topic=topic_of)
    strat = TrainedRouter({"max_steps": 7})
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert {c.qid[0] for c in pool.calls} == {"d"}  # fit never sees a test question
    # argmax per question: d0..d5 cycle through the experts; d6, d7 (all right) teach nothing
    assert strat.fitted["labels"][:6] == [0, 1, 2, 0, 1, 2]
    [call] = trained
    model, rows = call["jobs"]["router"]
    assert model == "m0" and call["cfg"].max_steps == 7  # the router is the first model
    assert [r["messages"][-1]["content"] for r in rows] == ["Model 1", "Model 2", "Model 3"] * 2
    assert "Question d1 beta" in rows[1]["messages"][0]["content"]
    pool.calls.clear()
    out = solve_all(strat, ctx, ctx.task.test.examples)
    assert {k: a.meta["routed_to"] for k, a in out.items()} == {"t0": "m0", "t1": "m1", "t2": "m2"}
    assert out["t1"].output == "Answer: 7 from m1"
    assert [(m, lora) for m, _, _, lora in pool.scored] == [("m0", "/adapters/router")] * 3
    assert all(c.lora is None for c in pool.calls)  # answers come from the plain models


def test_router_ties_go_to_the_first_or_the_shorter_answer(lora_toy, trained):
    def respond(call):
        if call.model == "m0":
            return "Answer: 0"
        return gen("Answer: 7 " + "pad " * (3 if call.model == "m1" else 1), end=True)

    ctx, _ = lora_toy(["m0", "m1", "m2"], respond, router_scorer)
    strat = TrainedRouter()
    run(strat.fit_checked(ctx, ctx.task.dev))
    # m1 and m2 tie on every question: by the job's order the label is always m1
    assert strat.fitted["labels"] == [1] * 4 and not trained
    assert strat.fitted["fallback"] == "m1"
    strat = TrainedRouter({"tie_break": "fewer_tokens"})
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert strat.fitted["labels"] == [2] * 4 and strat.fitted["fallback"] == "m2"


def test_router_without_dev_signal_falls_back_to_the_best_dev_model(lora_toy, trained):
    ctx, pool = lora_toy(["m0", "m1"], lambda c: "Answer: 7")
    strat = TrainedRouter()
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert not trained and strat.fitted["adapter"] is None and strat.fitted["fallback"] == "m0"
    ex = ctx.task.test.examples[0]
    ans = run(strat.solve(ctx.example(ex), ex))
    assert ans.meta["routed_to"] == "m0" and "fallback" in ans.meta and not pool.scored


def test_router_param_errors(lora_toy):
    ctx, _ = lora_toy(["m0", "m1"], lambda c: "Answer: 7")
    with pytest.raises(ValueError, match="router_model"):
        run(TrainedRouter({"router_model": "nope"}).fit_checked(ctx, ctx.task.dev))
    with pytest.raises(ValueError, match="model_descriptions"):
        run(TrainedRouter({"model_descriptions": ["x"]}).fit_checked(ctx, ctx.task.dev))
    with pytest.raises(ValidationError):
        TrainedRouter({"max_steps": 0})
    with pytest.raises(ValidationError):
        TrainedRouter({"unknown": 1})
    ex = ctx.task.test.examples[0]
    with pytest.raises(RuntimeError, match="needs fit"):
        run(TrainedRouter().solve(ctx.example(ex), ex))
    with pytest.raises(TypeError, match="dev data only"):
        run(TrainedRouter().fit_checked(ctx, ctx.task.test))


# --- Co-LLM ---------------------------------------------------------------------------------------

GOLD = ["A", " B", " C"]


def next_token(done: str) -> str:
    """The gold token after the gold prefix `done` ('' at the end)."""
    acc = ""
    for tok in GOLD:
        if acc == done:
            return tok
        acc += tok
    return ""


def collm_respond(call):
    done = written(call)
    if call.model == "base" and call.lora is not None:  # the trained base, writing 8 tokens
        return {"": gen("A<defer> Z Z", 4), "A<defer> B": gen(" C", 1, end=True)}[done]
    if call.model == "asst" and call.lora is None:
        tok = next_token(done)
        return gen(tok, 1, end=not tok)
    assert call.lora is None
    tok = next_token(done)
    if done == "A":
        tok = " X"  # the base gets the second word wrong
    return gen(tok, 1, end=not tok)


def test_collm_labels_defer_where_the_base_is_wrong_and_the_assistant_right(lora_toy, trained):
    ctx, pool = lora_toy(["base", "asst"], collm_respond, task=word_task("A B C"))
    strat = CoLLM({"max_steps": 5})
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert strat.fitted["targets"] == ["A<defer> B C"] * 2 and strat.fitted["dev_deferrals"] == 2
    [call] = trained
    model, rows = call["jobs"]["collm_base"]
    assert model == "base" and call["cfg"].max_steps == 5
    # the trainer needs a batch of 4: the two dev rows are repeated
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": f"Question d{i}"},
         {"role": "assistant", "content": "A<defer> B C"}] for i in (0, 1, 0, 1)]
    label_calls = [c for c in pool.calls if c.params.max_tokens == 1]
    assert label_calls and all(c.params.temperature == 0.0 for c in label_calls)
    assert {c.qid[0] for c in pool.calls} == {"d"}


def test_collm_hands_the_patch_after_the_marker_to_the_assistant_and_goes_on(lora_toy, trained):
    ctx, pool = lora_toy(["base", "asst"], collm_respond, task=word_task("A B C"))
    strat = CoLLM({"base_patch_tokens": 8})
    run(strat.fit_checked(ctx, ctx.task.dev))
    pool.calls.clear()
    ex = ctx.task.test.examples[0]
    ans = run(strat.solve(ctx.example(ex), ex))
    assert ans.output == "A B C" and ctx.task.score(ans.output, ex) == 1.0
    assert ans.meta["deferrals"] == 1 and ans.meta["assistant_patches"] == [" B"]
    steps = [(c.model, c.lora, written(c), c.params.max_tokens) for c in pool.calls]
    assert steps == [("base", "/adapters/collm_base", "", 8),
                     ("asst", None, "A", 1),  # the assistant sees the answer without markers
                     ("base", "/adapters/collm_base", "A<defer> B", 8)]  # the base, with them


def test_collm_finds_a_marker_split_across_base_patches(lora_toy, trained):
    def respond(call):
        done = written(call)
        if call.model == "base":
            return {"": gen("A<def", 2), "A<def": gen("er> Q", 2),
                    "A<defer> B": gen(" C", 1, end=True)}[done]
        return gen(" B", 1)

    ctx, pool = lora_toy(["base", "asst"], respond, task=word_task("A B C"))
    strat = CoLLM({"base_patch_tokens": 2})
    strat.fitted.update(base="base", assistant="asst", adapter="/adapters/x")
    ex = ctx.task.test.examples[0]
    ans = run(strat.solve(ctx.example(ex), ex))
    assert ans.output == "A B C"
    assert [written(c) for c in pool.of("asst")] == ["A"]


def test_collm_respects_the_token_budget(lora_toy):
    def respond(call):  # the base defers at once, every time; the assistant writes 2 tokens
        return gen("<defer>", 1) if call.model == "base" else gen(" w w", 2)

    task = word_task("x", max_tokens=5)
    ctx, pool = lora_toy(["base", "asst"], respond, task=task)
    strat = CoLLM({"patch_tokens": 2})
    strat.fitted.update(base="base", assistant="asst", adapter="/adapters/x")
    ex = task.test.examples[0]
    ans = run(strat.solve(ctx.example(ex), ex))
    assert ans.output == " w w" * 3 and ans.meta["deferrals"] == 3
    assert [c.params.max_tokens for c in pool.of("asst")] == [2, 2, 1]


def test_collm_without_deferral_labels_trains_nothing_and_the_base_answers(lora_toy, trained):
    def respond(call):
        if call.model == "asst":
            return gen(" Z", 1)
        tok = next_token(written(call))
        return gen(tok, 1, end=not tok)

    ctx, pool = lora_toy(["base", "asst"], respond, task=word_task("A B C"))
    strat = CoLLM()
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert not trained and strat.fitted["adapter"] is None
    assert strat.fitted["targets"] == ["A B C"] * 2
    pool.calls.clear()
    ex = ctx.task.test.examples[0]
    assert run(strat.solve(ctx.example(ex), ex)).output == "A B C"
    assert {c.model for c in pool.calls} == {"base"} and all(c.lora is None for c in pool.calls)


def test_collm_gold_falls_back_to_a_correct_model_answer(lora_toy, trained):
    # The toy metric reads 'Answer: X', so the bare reference '7' is no answer: the gold is the
    # assistant's own correct answer, and the base (wrong at the start) learns to defer.
    def respond(call):
        done = written(call)
        if call.params.max_tokens > 1:  # full dev answers
            return gen("Answer: 7" if call.model == "asst" else "Answer: 0", end=True)
        if call.model == "asst":
            return gen({"": "Answer:", "Answer:": " 7"}.get(done, ""), 1, end=done == "Answer: 7")
        return gen({"": "Answer:", "Answer:": " 0"}.get(done, ""), 1, end=done == "Answer: 7")

    ctx, _ = lora_toy(["base", "asst"], respond, n_dev=2)
    strat = CoLLM()
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert strat.fitted["targets"] == ["Answer:<defer> 7"] * 2


def test_collm_follows_and_params():
    assert follows(" B", " B C") == 2 and follows(" B\n", " B") == 2
    assert follows(" X", " B C") == 0 and follows("", " B") == 0
    with pytest.raises(ValidationError, match="two different"):
        CoLLM({"base_model": "a", "assistant_model": "a"})
    with pytest.raises(ValidationError):
        CoLLM({"patch_tokens": 0})


def test_collm_needs_two_models(lora_toy):
    ctx, _ = lora_toy(["only"], lambda c: "x", task=word_task("A"))
    with pytest.raises(ValueError, match="at least 2 models"):
        run(CoLLM().fit_checked(ctx, ctx.task.dev))


# --- Switch Generation ------------------------------------------------------------------------------

def switch_respond(call):
    """'early' writes the first patch right and later ones wrong, 'late' the reverse."""
    done = written(call)
    if done == "":
        return gen("p q" if call.model == "early" else "y y", 2)
    if done == "p q":
        return gen(" r s" if call.model == "late" else " x x", 2)
    return gen(" z z", 2)


def switch_task():
    return word_task("p q r s", n_dev=3, n_test=1, max_tokens=4)


def test_switch_labels_are_the_model_with_the_best_rollout_reward(lora_toy, trained):
    ctx, pool = lora_toy(["early", "late"], switch_respond, task=switch_task())
    strat = SwitchGeneration({"patch_tokens": 2, "training_instances": 12, "rollouts": 8,
                              "max_steps": 3})
    run(strat.fit_checked(ctx, ctx.task.dev))
    assert {c.qid[0] for c in pool.calls} == {"d"}
    [call] = trained
    model, rows = call["jobs"]["selector"]
    assert model == "early" and call["cfg"].max_steps == 3
    by_prefix = {}
    for r in rows:
        prompt, label = r["messages"][0]["content"], r["messages"][1]["content"]
        by_prefix.setdefault("<model" in prompt, set()).add(label)
        if "<model" in prompt:  # only a right first patch leaves anything to win
            assert "<model 0 begins> p q <model 0 ends>" in prompt
    # empty prefix: only rollouts started by 'early' can end right; after 'p q': only 'late'
    assert by_prefix == {False: {"0"}, True: {"1"}}
    assert strat.fitted["train_rows"] == len(strat.fitted["labels"]) >= 2


def test_switch_selector_picks_each_patch_writer_at_test_time(lora_toy, trained):
    def scorer(model, text, cont, lora):
        assert model == "early" and lora == "/adapters/selector"
        want = "1" if "<model" in text else "0"
        return 0.0 if cont == want else -3.0

    ctx, pool = lora_toy(["early", "late"], switch_respond, scorer, task=switch_task())
    strat = SwitchGeneration({"patch_tokens": 2, "training_instances": 12, "rollouts": 8})
    run(strat.fit_checked(ctx, ctx.task.dev))
    pool.calls.clear()
    ex = ctx.task.test.examples[0]
    ans = run(strat.solve(ctx.example(ex), ex))
    assert ans.output == "p q r s" and ans.meta["writers"] == ["early", "late"]
    assert [c.params.max_tokens for c in pool.calls] == [2, 2]
    second = pool.scored[-1][1]
    assert second.startswith("Question t0 <model 0 begins> p q <model 0 ends> Which model")


def test_switch_reward_model_judges_rollouts_instead_of_the_metric(lora_toy, trained):
    def judge(model, text, cont, lora):  # likes answers that start with 'y y' (metric: wrong)
        assert model == "judge" and lora is None
        liked = "Response: y y" in text
        return {"Yes": 0.0 if liked else -4.0, "No": -4.0 if liked else 0.0}[cont]

    ctx, pool = lora_toy(["early", "late"], switch_respond, judge, task=switch_task())
    pool.models.append("judge")
    strat = SwitchGeneration({"patch_tokens": 2, "training_instances": 12, "rollouts": 8,
                              "reward_model": "judge"})
    run(strat.fit_checked(ctx, ctx.task.dev))
    labels = strat.fitted["labels"]
    assert labels and set(labels) == {"1"}  # the judge prefers what 'late' starts with
    assert strat.fitted["fallback"] == "late" and not trained  # one label: no selector needed
    assert all(m == "judge" for m, *_ in pool.scored)


def test_switch_param_errors(lora_toy):
    ctx, _ = lora_toy(["early", "late", "third"], switch_respond, task=switch_task())
    with pytest.raises(ValueError, match="rollouts"):
        run(SwitchGeneration({"rollouts": 2}).fit_checked(ctx, ctx.task.dev))
    with pytest.raises(ValueError, match="reward_model"):
        run(SwitchGeneration({"reward_model": "nope"}).fit_checked(ctx, ctx.task.dev))
    with pytest.raises(ValueError, match="selector_model"):
        run(SwitchGeneration({"selector_model": "nope"}).fit_checked(ctx, ctx.task.dev))
    with pytest.raises(ValidationError):
        SwitchGeneration({"patch_tokens": 0})


# --- the selectors see the same input in training and at test time ---------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo.tiny_tokenizer_dir())


def selector_scorer(model, text, cont, lora):
    return 0.0 if cont == "0" else -3.0


@pytest.mark.parametrize("method", ["api_trained_router", "api_switch_generation"])
def test_selector_scores_labels_after_the_input_it_was_trained_on(lora_toy, trained,
                                                                 tiny_tokenizer, method):
    """For one dev example, the text (and token ids) the trainer puts before the label equal
    those the engine puts before the labels it scores at test time, rendered by a real
    tokenizer with a chat template (trainer: training/data.py; engine: models/tokenizer.py)."""
    tok = tiny_tokenizer
    if method == "api_trained_router":
        ctx, pool = lora_toy(["m0", "m1", "m2"], expert_respond, router_scorer, n_dev=8,
                             topic=topic_of)
        strat, name = TrainedRouter(), "router"
    else:
        ctx, pool = lora_toy(["early", "late"], switch_respond, selector_scorer,
                             task=switch_task())
        strat = SwitchGeneration({"patch_tokens": 2, "training_instances": 12, "rollouts": 8})
        name = "selector"
    run(strat.fit_checked(ctx, ctx.task.dev))
    [call] = trained
    _, rows = call["jobs"][name]
    # A row of the first routing decision (for Switch Generation: no patch written yet).
    row = next(r for r in rows if "<model" not in r["messages"][0]["content"])
    ex = next(e for e in ctx.task.dev.examples
              if re.search(rf"{re.escape(e.question)}\b", row["messages"][0]["content"]))
    run(strat.solve(ctx.example(ex), ex))
    shown = pool.scored_prompts[0]  # the first choice on this example, before any patch

    msgs = row["messages"]
    before_label = segments(tok, msgs)[0]
    assert not before_label[1] and before_label[0] == render_prompt(tok, shown)
    enc = tokenize_row(row, tok, 4096, 0)
    first = next(i for i, lab in enumerate(enc["labels"]) if lab != IGNORE)
    assert enc["input_ids"][:first] == encode_prompt(tok, shown)
    label = encode_continuation(tok, msgs[-1]["content"])
    assert enc["input_ids"][first:first + len(label)] == label
