"""The model list and adapter residency: /v1/models, /v1/adapters/load, /v1/adapters/unload.

Loads and unloads are queued on the engine like requests, so they run between batches and never
fail a running one.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import protocol as p
from .engine import Engine
from .http import ApiError, api_error


def adapter_routes(engine: Engine, dependencies=()) -> APIRouter:
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/v1/models")
    async def models() -> p.ModelList:
        resident = set(engine.registry.resident())
        cards = [p.ModelCard(id=engine.model_name)]
        cards += [p.ModelCard(id=n, parent=engine.model_name, resident=n in resident)
                  for n in engine.registry.available()]
        return p.ModelList(data=cards)

    @router.post("/v1/adapters/load")
    async def load_adapter(body: p.AdapterRequest):
        return await control("load", body.name)

    @router.post("/v1/adapters/unload")
    async def unload_adapter(body: p.AdapterRequest):
        return await control("unload", body.name)

    async def control(kind: str, name: str):
        try:
            if name == engine.model_name:
                raise ApiError(400, f"'{name}' is the base model, not an adapter.", "invalid_request_error")
            engine.adapter_of(name)
            job = engine.submit(kind, name)
            event, value = await job.events.get()
            if event == "error":
                raise value
        except Exception as err:
            raise api_error(err) from None
        return {"object": "adapter", "id": name, "changed": bool(value),
                "resident": name in engine.registry.resident()}

    return router
