"""The article pipeline: fetch -> convert -> summarize (map) + keywords -> publish."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pgflow_sa import Context, Flow, FlowRegistry


class ArticleInput(BaseModel):
    article_id: int
    url: str


article_flow = Flow("article_pipeline", max_attempts=3, timeout=30)


@article_flow.step
async def fetch(input: ArticleInput, ctx: Context) -> str:
    # a real app would download input.url; the example makes up the page
    return f"{input.url} is about workflows.\n\nPostgres keeps the state.\n\nPython runs the steps."


@article_flow.step(depends_on=[fetch])
def convert(input: dict[str, Any], ctx: Context) -> list[str]:
    return [p.strip() for p in input["fetch"].split("\n\n") if p.strip()]


@article_flow.map(depends_on=convert)
async def summarize(paragraph: str, ctx: Context) -> str:
    return paragraph.split(" ")[0]


@article_flow.step(depends_on=[convert])
def keywords(input: dict[str, Any], ctx: Context) -> list[str]:
    words = {w.strip(".").lower() for p in input["convert"] for w in p.split() if len(w) > 6}
    return sorted(words)


@article_flow.step(depends_on=[summarize, keywords])
def publish(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"summary": " / ".join(input["summarize"]), "keywords": input["keywords"]}


registry = FlowRegistry(article_flow)
