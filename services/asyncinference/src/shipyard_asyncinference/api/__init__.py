"""The gRPC face of the service."""

from shipyard_asyncinference.api.servicer import AsyncInferenceServicer, request_message

__all__ = ["AsyncInferenceServicer", "request_message"]
