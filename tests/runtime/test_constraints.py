"""Constrained decoding (response_format): the JSON-Schema-Test-Suite token by token on SmolLM2's tokenizer,
and the real 135M model's answers on realistic schemas, each validated with jsonschema.

Suite rule (shared/data/json-schema-test-suite/README): for every schema the matcher accepts, each invalid
instance must be refused somewhere, and each valid one accepted token by token, except where the grammar is
deliberately stricter than the spec, each such case by a rule, never by name: `format` is enforced (the spec
makes it an annotation), integers are written without a fraction (`1`, not `1.0`), and object keys come in
the order the schema declares them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from smolexport_runtime import BatchEngine, SamplingConfig, load
from smolexport_runtime.bench_structured import SCHEMA as ORDER_SCHEMA
from smolexport_runtime.constraints import (
    ConstrainedSampler,
    ConstraintError,
    GrammarTokenizer,
    parse_response_format,
    precompute_masks,
)

from .conftest import count_forward_calls

SUITE = Path(__file__).resolve().parents[3] / "shared" / "data" / "json-schema-test-suite" / "draft2020-12"
REALISTIC = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org|fr)$"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": ORDER_SCHEMA,  # the structured benchmark's schema: nested objects, a bounded array, patterns
    "answer_or_error": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"answer": {"type": "string", "maxLength": 40}},
                "required": ["answer"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"error": {"const": "unknown"}},
                "required": ["error"],
                "additionalProperties": False,
            },
        ]
    },  # fmt: skip
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "celsius": {"type": "number", "minimum": -60, "maximum": 60},
            "conditions": {"type": "array", "items": {"enum": ["sun", "rain", "snow", "wind"]}, "maxItems": 2},
            "alert": {"type": ["string", "null"], "maxLength": 30},
        },
        "required": ["city", "celsius", "conditions", "alert"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "person": "Extract the person: Dr. Alice Martin, aged 52, can be reached at alice@clinic.fr.",
    "order": "Turn this into an order: two ABC-123 at 9.50 each and one XYZ-777 at 120, already paid.",
    "answer_or_error": "Who wrote Les Misérables? Answer as JSON.",
    "weather": "Describe today's weather in Oslo as JSON: minus four degrees, snow and wind, no alert.",
}


@pytest.fixture(scope="module")
def real(bundled_exports):
    return load(bundled_exports / "int4", providers="cpu")


@pytest.fixture(scope="module")
def grammar(real) -> GrammarTokenizer:
    return real.grammar_tokenizer()


def suite_groups():
    for path in sorted(SUITE.glob("*.json")):
        for group in json.loads(path.read_text()):
            yield pytest.param(group, id=f"{path.stem}: {group['description']}")


def accepts(grammar: GrammarTokenizer, compiled, tokenizer, data) -> bool:
    text = json.dumps(data, ensure_ascii=False, separators=(", ", ": "))
    matcher = grammar.matcher(compiled)
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False).ids) and matcher.is_accepting()


def deliberately_stricter(grammar, compiled, tokenizer, schema, data) -> bool:
    """The documented cases where a valid instance is not one the grammar writes (see the module doc)."""
    if "format" in json.dumps(schema):
        return True
    if has_integral_float(data):
        return True
    if isinstance(data, dict) and 1 < len(data) <= 5:  # the same object with its keys in another order
        return any(accepts(grammar, compiled, tokenizer, dict(p)) for p in itertools.permutations(data.items()))
    return False


def has_integral_float(data) -> bool:
    if isinstance(data, float):
        return data.is_integer()
    if isinstance(data, dict):
        return any(has_integral_float(v) for v in data.values())
    if isinstance(data, list):
        return any(has_integral_float(v) for v in data)
    return False


@pytest.mark.skipif(not SUITE.is_dir(), reason=f"{SUITE} is missing (shared/data)")
def test_json_schema_test_suite_token_by_token(real, grammar):
    tokenizer = real.tokenizer
    counts = {"accepted": 0, "refused": 0, "stricter": 0}
    wrong = []
    for param in suite_groups():
        group = param.values[0]
        schema = group["schema"] if isinstance(group["schema"], dict) else {"allOf": [group["schema"]]}
        try:
            compiled = grammar.compile(parse_response_format(schema))
        except ConstraintError as exc:
            counts["refused"] += 1
            assert str(exc).startswith("response_format"), exc  # a clear message, never a crash
            continue
        counts["accepted"] += 1
        for test in group["tests"]:
            if accepts(grammar, compiled, tokenizer, test["data"]) == test["valid"]:
                continue
            if test["valid"] and deliberately_stricter(grammar, compiled, tokenizer, schema, test["data"]):
                counts["stricter"] += 1
                continue
            wrong.append(f"{param.id} / {test['description']} (valid: {test['valid']})")
    assert not wrong, "\n".join(wrong)
    assert counts["accepted"] >= 100 and counts["refused"] >= 50, counts  # both kinds really happened


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "uniqueItems": True},
        {"not": {"type": "string"}},
        {"$ref": "http://localhost:1234/draft2020-12/integer.json"},
        {"type": "object", "unevaluatedProperties": False},
    ],
    ids=["uniqueItems", "not", "remote $ref", "unevaluatedProperties"],
)
def test_schemas_the_engine_cannot_enforce_are_refused_up_front(real, schema):
    with pytest.raises(ConstraintError, match="cannot be enforced"):
        real.generate("w", response_format=schema, max_new_tokens=4)


@pytest.mark.parametrize("name", list(REALISTIC))
@pytest.mark.parametrize("sampling", [{"greedy": True}, {"temperature": 0.8, "top_p": 0.95, "seed": 7}])
def test_the_real_model_answers_validate_against_their_schema(real, name, sampling):
    answer = real.generate_json(PROMPTS[name], REALISTIC[name], max_new_tokens=200, **sampling)
    jsonschema.validate(answer, REALISTIC[name])


def test_pydantic_models_regex_and_lark(real):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        # Pydantic's schema allows extra keys unless told not to; then the model may add keys of its own.
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str
        country: str
        # Bounded: the 135M model, left an unbounded number, can repeat a digit until max_new_tokens.
        founded_year: int = pydantic.Field(ge=-1000, le=2100)

    city = real.generate_json("Describe Paris as JSON.", City, max_new_tokens=80)
    assert isinstance(city, City) and city.name
    date = real.generate("When did the Berlin wall fall?", response_format={"type": "regex", "pattern": "[0-9]{4}"})
    assert len(date) == 4 and date.isdigit()
    lark = 'start: "yes" | "no"'
    assert real.generate("Is Paris in France?", response_format={"type": "lark", "grammar": lark}) in ("yes", "no")


def test_forced_tokens_run_as_one_step_with_the_same_answer(bundled_exports, monkeypatch):
    """On the fp32 export, feeding the grammar's forced tokens as one multi-token step gives the answer that
    feeding them one decode step at a time gives, in fewer model steps."""
    model = load(bundled_exports / "fp32", providers="cpu")
    prompt, schema = PROMPTS["order"], REALISTIC["order"]
    fast = model.generate(prompt, response_format=schema, max_new_tokens=160)
    _, steps = count_forward_calls(model, lambda: model.generate(prompt, response_format=schema, max_new_tokens=160))
    monkeypatch.setattr(ConstrainedSampler, "forced", lambda self, limit: [])
    _, slow_steps = count_forward_calls(
        model, lambda: model.generate(prompt, response_format=schema, max_new_tokens=160)
    )
    assert model.generate(prompt, response_format=schema, max_new_tokens=160) == fast
    jsonschema.validate(json.loads(fast), schema)
    assert steps < 0.8 * slow_steps, (steps, slow_steps)


def test_the_batch_engine_constrains_each_slot_its_own_way(bundled_exports):
    """Each slot has its own grammar. While rows decode together, the tokens a grammar forces ride along one
    a step in the batched steps (no forward pass of their own); a row decoding alone runs them as one step.

    On the fp32 export, so that each answer must equal the request's answer alone. The int4 graph (MatMulNBits
    at accuracy level 4) gives logits up to ~1 apart for the same tokens fed one a step or in one multi-token
    step (benchmarks/step_grouping.py), so a near tie can go either way: on int4 a CI run answered "snow"
    together and "no" alone. fp32's two paths agree to 5e-5."""
    real = load(bundled_exports / "fp32", providers="cpu")
    engine = BatchEngine(real, max_batch=4, max_queue=8)
    passes, forward = [0], real.decoder.forward

    def counted(*args, **kwargs):
        passes[0] += 1
        return forward(*args, **kwargs)

    real.decoder.forward = counted
    try:
        engine.start()
        requests = {
            name: engine.submit(real.encode(PROMPTS[name]), SamplingConfig(), 200, response_format=REALISTIC[name])
            for name in ("person", "weather")
        }
        free = engine.submit(real.encode("What is the capital of France?"), SamplingConfig(), 12)
        answers = {name: "".join(r.pieces()) for name, r in requests.items()}
        assert "Paris" in "".join(free.pieces())
    finally:
        engine.stop()
        real.decoder.forward = forward
    longest = max(r.stats.completion_tokens for r in requests.values())
    assert passes[0] <= longest + 3  # one pass a token of the longest answer, plus the three prompts' prefills
    for name, text in answers.items():
        jsonschema.validate(json.loads(text), REALISTIC[name])
        assert text == real.generate(PROMPTS[name], response_format=REALISTIC[name], max_new_tokens=200)


def test_masks_computed_together_are_the_masks_computed_alone(real):
    """The batch engine fills every constrained row's mask in one parallel llguidance call."""
    samplers = [real.sampler(SamplingConfig(), REALISTIC[name]) for name in ("person", "weather", "order")]
    assert samplers[2].forced(4)  # one grammar further on than the others
    alone = [s.allowed() for s in samplers]  # computing a mask does not advance the grammar
    assert not np.array_equal(alone[0], alone[2])
    precompute_masks(samplers)
    assert all(np.array_equal(s.allowed(), mask) for s, mask in zip(samplers, alone, strict=True))
    assert all(s._precomputed is None for s in samplers)  # used once; the next mask is computed afresh
