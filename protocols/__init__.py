"""What crosses the wire, with no I/O: OBIS codes, the COSEM-like object model, commands, codecs.

Nothing in this package imports asyncio, serial, paho, pymodbus or sqlalchemy; a test walks the
imports to keep it that way.
"""
