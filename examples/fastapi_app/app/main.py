"""FastAPI app: start the pipeline inside the request's transaction, wait or stream."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from pgflow_sa import (
    RunTimeoutError,
    async_engine_from_url,
    get_database_url,
    get_run_async,
    start_flow_async,
    wait_for_run_async,
    watch_run,
)

from .flows import article_flow
from .models import Article

# the database every pgflow-sa command uses: PGFLOW_SA_DATABASE_URL, else the embedded
# server in the current folder (so the app, its migrations and its worker agree)
engine = async_engine_from_url(get_database_url())
app = FastAPI(title="pgflow-sa example")


class NewArticle(BaseModel):
    url: str


@app.post("/articles", status_code=201)
async def create_article(body: NewArticle) -> dict[str, Any]:
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        article = Article(url=body.url)
        session.add(article)
        await session.flush()
        run = await start_flow_async(
            session, article_flow, {"article_id": article.id, "url": body.url}
        )
        article.run_id = run.run_id
    # one commit: the article row, the run and its first queue message, or none of them
    return {"article_id": article.id, "run_id": str(run.run_id)}


@app.get("/runs/{run_id}")
async def show_run(run_id: uuid.UUID, wait: float = 0) -> dict[str, Any]:
    try:
        if wait:
            run = await wait_for_run_async(engine, run_id, timeout=wait)
        else:
            async with engine.connect() as conn:
                found = await get_run_async(conn, run_id)
            if found is None:
                raise HTTPException(404, f"no run {run_id}")
            run = found
    except RunTimeoutError as exc:
        raise HTTPException(504, str(exc)) from None
    return {"status": run.status.value, "output": run.output, "error": run.error}


@app.get("/runs/{run_id}/events")
async def stream_run(run_id: uuid.UUID) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async for event in watch_run(engine, run_id, timeout=60):
            yield f"event: {event.event}\ndata: {json.dumps(event.payload, default=str)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
