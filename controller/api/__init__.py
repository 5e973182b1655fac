"""The management HTTP API that ``edgefleet serve`` runs beside the MQTT service.

=====================  ========================================================
module                 what
=====================  ========================================================
:mod:`.auth`           bearer tokens and roles on every route
:mod:`.errors`         JSON errors ``{"error": {"code", "message"}}``
:mod:`.limits`         request bodies bounded before anything reads them
:mod:`.resources`      registry results as JSON, device filters
:mod:`.routes`         the ``/api/v1`` routes (thin: they call the registry,
                       the rollout store and the running service)
:mod:`.metrics`        ``/metrics``: a Prometheus collector read at scrape time
:mod:`.app`            builds the FastAPI application
:mod:`.server`         runs it under uvicorn in a thread of the serve process
=====================  ========================================================

The ``[api]`` settings live in :mod:`edgefleet.controller.config`.
"""
