"""The async inference service: asynchronous prediction requests, queued durably, run by
workers through the gateway, with their status and results kept for a while."""
