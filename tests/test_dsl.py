"""Flow definitions: every rule with its exact message, handlers, input types."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pydantic
import pytest
from typing_extensions import TypedDict

from pgflow_sa import Context, Flow, FlowDefinitionError, FlowRegistry, InvalidInputError


def noop(input: Any, ctx: Context) -> Any:
    return input


def _error(call: Any) -> str:
    with pytest.raises(FlowDefinitionError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(
    ("slug", "message"),
    [
        ("", "Flow '': the flow slug must not be empty"),
        ("1flow", "Flow '1flow': the flow slug cannot start with a number"),
        ("_flow", "Flow '_flow': the flow slug cannot start with an underscore"),
        ("my flow", "Flow 'my flow': the flow slug cannot contain spaces"),
        (
            "my-flow",
            "Flow 'my-flow': the flow slug cannot contain special characters like /, :, ?, #, -",
        ),
        ("a/b", "Flow 'a/b': the flow slug cannot contain special characters like /, :, ?, #, -"),
        (
            "what?",
            "Flow 'what?': the flow slug cannot contain special characters like /, :, ?, #, -",
        ),
        (
            "x'; DROP TABLE t; --",
            'Flow "x\'; DROP TABLE t; --": the flow slug cannot contain spaces',
        ),
        (
            "o'neil",
            'Flow "o\'neil": the flow slug may contain only ASCII letters, digits and underscores',
        ),
        (
            "café",
            "Flow 'café': the flow slug may contain only ASCII letters, digits and underscores",
        ),
        (
            "x" * 129,
            f"Flow '{'x' * 129}': the flow slug cannot be longer than 128 characters (it has 129)",
        ),
        (
            "x" * 48,
            f"Flow '{'x' * 48}': the flow slug is also its pgmq queue name, which can be at most "
            "47 characters (it has 48); choose a shorter slug",
        ),
    ],
)
def test_flow_slug_rules(slug: str, message: str) -> None:
    assert _error(lambda: Flow(slug)) == message


def test_flow_slug_must_be_a_string() -> None:
    assert _error(lambda: Flow(5)) == "Flow 5: the flow slug must be a string, not int"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "Flow 'f': max_attempts must be greater than or equal to 1 (got 0)"),
        ({"base_delay": 0}, "Flow 'f': base_delay must be greater than or equal to 1 (got 0)"),
        ({"timeout": 2}, "Flow 'f': timeout must be greater than or equal to 3 (got 2)"),
        ({"timeout": 2.5}, "Flow 'f': timeout must be an integer number of seconds, not 2.5"),
        (
            {"max_attempts": True},
            "Flow 'f': max_attempts must be an integer number of attempts, not True",
        ),
    ],
)
def test_flow_option_minima(options: dict[str, Any], message: str) -> None:
    assert _error(lambda: Flow("f", **options)) == message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"max_attempts": 0},
            "Flow 'f', step 's': max_attempts must be greater than or equal to 1 (got 0)",
        ),
        (
            {"base_delay": -1},
            "Flow 'f', step 's': base_delay must be greater than or equal to 1 (got -1)",
        ),
        ({"timeout": 1}, "Flow 'f', step 's': timeout must be greater than or equal to 3 (got 1)"),
        (
            {"start_delay": -5},
            "Flow 'f', step 's': start_delay must be greater than or equal to 0 (got -5)",
        ),
        (
            {"start_delay": "5"},
            "Flow 'f', step 's': start_delay must be an integer number of seconds, not '5'",
        ),
    ],
)
def test_step_option_minima(options: dict[str, Any], message: str) -> None:
    flow = Flow("f")
    assert _error(lambda: flow.step(slug="s", **options)(noop)) == message
    assert flow.steps == ()


def test_step_slug_rules() -> None:
    flow = Flow("f")
    assert _error(lambda: flow.step(slug="bad-slug")(noop)) == (
        "Flow 'f', step 'bad-slug': the step slug cannot contain special characters like /, :, ?, #, -"
    )
    assert _error(lambda: flow.step(slug="run")(noop)) == (
        "Flow 'f', step 'run': 'run' is reserved (task inputs use it for the flow input); "
        "choose another slug"
    )

    def _private(input: Any, ctx: Context) -> None: ...

    assert _error(lambda: flow.step(_private)) == (
        "Flow 'f', step '_private': the step slug cannot start with an underscore; "
        "name the function differently or pass slug=..."
    )


def test_duplicate_step() -> None:
    flow = Flow("f")
    flow.step(slug="a")(noop)
    assert _error(lambda: flow.step(slug="a")(noop)) == (
        "Flow 'f', step 'a': a step with this slug already exists in the flow"
    )


def test_dependencies_must_be_defined_first() -> None:
    flow = Flow("f")
    assert _error(lambda: flow.step(slug="b", depends_on=["a"])(noop)) == (
        "Flow 'f', step 'b' depends on undefined step 'a'; define that step first"
    )
    other = Flow("other")

    @other.step
    def foreign(input: Any, ctx: Context) -> None: ...

    assert _error(lambda: flow.step(slug="c", depends_on=[foreign])(noop)) == (
        "Flow 'f', step 'c' depends on foreign(), which is not a step of flow 'f'; "
        "define it with this flow's @step or @map first"
    )
    flow.step(slug="a")(noop)
    assert _error(lambda: flow.step(slug="d", depends_on=["a", "a"])(noop)) == (
        "Flow 'f', step 'd' lists dependency 'a' twice"
    )
    assert _error(lambda: flow.step(slug="e", depends_on=[3])(noop)) == (  # type: ignore[list-item]
        "Flow 'f', step 'e': depends_on takes step slugs or step functions, not 3"
    )


def test_map_takes_at_most_one_dependency() -> None:
    flow = Flow("f")
    flow.step(slug="a")(noop)
    flow.step(slug="b")(noop)
    assert _error(lambda: flow.map(slug="m", depends_on=["a", "b"])(noop)) == (
        "Flow 'f', step 'm': a map step can depend on at most one step (the one whose array it "
        "maps over), got ['a', 'b']; add a step that combines them first"
    )


def test_handler_signature_is_checked() -> None:
    flow = Flow("f")

    def three(a: Any, b: Any, c: Any) -> None: ...

    def keyword_only(a: Any, *, must: Any) -> None: ...

    assert _error(lambda: flow.step(three)) == (
        "Flow 'f', step 'three': the handler must take (input, ctx) or (input); "
        "three(a: 'Any', b: 'Any', c: 'Any') -> 'None' does not"
    )
    assert "keyword_only(a: 'Any', *, must: 'Any')" in _error(lambda: flow.step(keyword_only))
    assert _error(lambda: flow.step(slug="x")("nope")) == (  # type: ignore[arg-type]
        "Flow 'f', step 'x': the handler must be a function, not 'nope'"
    )


def test_cycles_cannot_be_written() -> None:
    """A step can only depend on steps defined before it, so a cycle has nowhere to start."""
    flow = Flow("f")
    flow.step(slug="a")(noop)
    assert _error(lambda: flow.step(slug="b", depends_on=["b"])(noop)) == (
        "Flow 'f', step 'b' depends on undefined step 'b'; define that step first"
    )


class Article(pydantic.BaseModel):
    url: str
    words: int = 0


class Totals(TypedDict):
    count: int


@dataclasses.dataclass
class Point:
    x: int


def test_natural_definition_and_handlers_for_unit_tests() -> None:
    flow = Flow("article_flow", max_attempts=4)

    @flow.step
    def fetch(input: Article, ctx: Context) -> dict[str, Any]:
        return {"url": input.url, "paragraphs": ["a", "b"]}

    @flow.map(depends_on=fetch, timeout=10)
    async def score(item: str, ctx: Context) -> int:
        return len(item)

    @flow.step(depends_on=[fetch, "score"], slug="publish")
    def publish_article(input: dict[str, Any]) -> bool:
        return bool(input)

    assert [s.slug for s in flow.steps] == ["fetch", "score", "publish"]
    assert flow.get_step("score").depends_on == ("fetch",)
    assert flow.get_step("score").is_map
    assert flow.get_step("publish").depends_on == ("fetch", "score")
    assert flow.get_step("publish").takes_context is False
    assert [s.slug for s in flow.leaf_steps] == ["publish"]
    # the decorators return the functions unchanged
    ctx = Context(flow_slug="article_flow", step_slug="fetch")
    assert fetch(Article(url="u"), ctx) == {"url": "u", "paragraphs": ["a", "b"]}
    assert flow.handler("fetch") is fetch
    assert asyncio.run(flow.handler("score")("abc", ctx)) == 3
    with pytest.raises(KeyError, match="flow 'article_flow' has no step 'nope'"):
        flow.handler("nope")


def test_input_types_validate_before_starting() -> None:
    flow = Flow("typed")

    @flow.step
    def first(input: Article, ctx: Context) -> None: ...

    assert flow.input_type is Article
    assert flow.validate_input({"url": "x"}) == {"url": "x", "words": 0}
    assert flow.validate_input(Article(url="y", words=3)) == {"url": "y", "words": 3}
    with pytest.raises(InvalidInputError) as info:
        flow.validate_input({"words": "many"})
    assert str(info.value) == (
        "invalid input for flow 'typed': url: Field required; "
        "words: Input should be a valid integer, unable to parse string as an integer"
    )

    mapped = Flow("mapped")

    @mapped.map
    def each(item: Point, ctx: Context) -> None: ...

    assert mapped.input_type == list[Point]
    assert mapped.validate_input([{"x": 1}]) == [{"x": 1}]
    with pytest.raises(InvalidInputError, match=r"0\.x: Input should be a valid integer"):
        mapped.validate_input([{"x": "a"}])

    untyped_map = Flow("untyped_map")
    untyped_map.map(slug="each")(noop)
    with pytest.raises(InvalidInputError) as info:
        untyped_map.validate_input({"not": "a list"})
    assert str(info.value) == (
        "invalid input for flow 'untyped_map': its root map step 'each' maps over the flow input, "
        "so the input must be a JSON array, not dict"
    )

    plain = Flow("plain", input_type=Totals)
    plain.step(slug="s")(noop)
    assert plain.validate_input({"count": "3"}) == {"count": 3}

    anything = Flow("anything")
    anything.step(slug="s")(noop)
    assert anything.validate_input(0) == 0
    with pytest.raises(InvalidInputError, match="it is not JSON-serialisable"):
        anything.validate_input({"when": object()})
    with pytest.raises(InvalidInputError, match="it is not JSON-serialisable"):
        anything.validate_input(float("nan"))


def test_registry() -> None:
    a, b = Flow("a"), Flow("b")
    registry = FlowRegistry(a)
    assert registry.register(b) is b
    assert [f.slug for f in registry] == ["a", "b"]
    assert "a" in registry and len(registry) == 2
    registry.register(a)  # the same flow again is fine
    assert _error(lambda: registry.register(Flow("a"))) == (
        "two different flows use the slug 'a'; flow slugs must be unique"
    )
    with pytest.raises(KeyError, match=r"no flow 'c' is registered \(registered: a, b\)"):
        registry.get("c")
    assert [f.slug for f in FlowRegistry.of([a, b])] == ["a", "b"]
    assert list(FlowRegistry.of(a)) == [a]


def test_unknown_step_option() -> None:
    flow = Flow("f")
    assert _error(lambda: flow.step(slug="s", retries=3)(noop)) == (  # type: ignore[call-overload]
        "Flow 'f': unknown step option(s) ['retries']; use slug, depends_on, max_attempts, "
        "base_delay, timeout, start_delay, max_concurrency"
    )


def test_concurrency_limits_are_checked_and_left_out_of_the_compiled_sql() -> None:
    from pgflow_sa import FlowLimits, compile_flow

    flow = Flow("limited_f", max_concurrency=4, max_running_runs=2)
    flow.step(slug="a", max_concurrency=1)(noop)
    flow.map(slug="b", depends_on="a")(noop)
    assert flow.limits() == FlowLimits(4, 2, {"a": 1})
    assert compile_flow(flow) == [
        "SELECT pgflow.create_flow('limited_f');",
        "SELECT pgflow.add_step('limited_f', 'a');",
        "SELECT pgflow.add_step('limited_f', 'b', ARRAY['a'], step_type => 'map');",
    ]
    assert Flow("plain").limits() is None
    assert _error(lambda: Flow("x", max_concurrency=0)) == (
        "Flow 'x': max_concurrency must be a whole number of at least 1 (or None for no "
        "limit), not 0"
    )
    assert _error(lambda: flow.step(slug="c", max_concurrency=True)(noop)).endswith(
        "max_concurrency must be a whole number of at least 1 (or None for no limit), not True"
    )
