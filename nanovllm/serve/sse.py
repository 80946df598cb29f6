"""Server-sent events: each chunk a `data: {json}` event, then `data: [DONE]`."""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from nanovllm.async_llm import EngineDeadError
from nanovllm.serve.errors import APIError, error_response
from nanovllm.serve.run import Run


def sse_response(run: Run, chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Stream `chunks`; the run is closed (its unfinished requests aborted) however the stream ends,
    a client that disconnects included (Starlette cancels the stream then)."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except EngineDeadError as e:  # the status line is out: the error goes in the stream
            yield f"data: {error_response(APIError(503, str(e), 'service_unavailable')).body.decode()}\n\n"
        finally:
            run.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
