"""The shared layer: what the agent and the controller both run.

It sits between :mod:`edgefleet.protocols` (pure data, no I/O) and the two
sides (:mod:`edgefleet.agent`, :mod:`edgefleet.controller`), which import it
and ``protocols`` but never each other. It holds the I/O both sides need:
the MQTT link, the model runtimes, durable files and the hardware
description. It must stay light enough for a gateway: nothing here may import
SQLAlchemy, click or the compiler (the contracts in ``pyproject.toml`` check
it).
"""
