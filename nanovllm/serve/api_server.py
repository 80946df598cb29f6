"""The OpenAI-compatible FastAPI app over an AsyncLLM: `build_app(llm, served_model_name)`."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from nanovllm.async_llm import AsyncLLM
from nanovllm.serve.chat import create_chat_completion
from nanovllm.serve.completions import create_completion
from nanovllm.serve.errors import APIError, install_error_handlers
from nanovllm.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from nanovllm.serve.state import ServerState


def build_app(llm: AsyncLLM, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts the engine loop and stops it at shutdown."""
    state = ServerState(llm, served_model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        llm.start()
        yield
        await llm.shutdown()

    app = FastAPI(title="nanovllm", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(api_router(state))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if llm.is_running else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(await llm.stats()), media_type=CONTENT_TYPE_LATEST)

    return app


def api_router(state: ServerState) -> APIRouter:
    """The /v1 routes, behind the API key when there is one."""
    async def check_api_key(request: Request) -> None:
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @router.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.served_model_name, max_model_len=state.max_model_len)])

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse | StreamingResponse:
        return await create_completion(state, body, request)

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> ChatCompletionResponse | StreamingResponse:
        return await create_chat_completion(state, body, request)

    return router
