"""The engine's HTTP server: FastAPI app, the /v1 API contract (pydantic schemas) and its security."""
