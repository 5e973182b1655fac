"""edgefleet: signed, quantized ML models for fleets of edge devices.

The distribution is split by role so that a gateway installs only what it
runs:

- :mod:`edgefleet.protocols` - pure, shared wire types (no I/O).
- :mod:`edgefleet.controller` - registry, TUF repository, MQTT side, CLI.
- :mod:`edgefleet.shared` - what both sides run: MQTT link, runtimes, durable files.
- :mod:`edgefleet.agent` - the gateway daemon; never imports the controller.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
