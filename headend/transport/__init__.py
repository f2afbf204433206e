"""Connections shared by the head-end's links and services (the MQTT client connection)."""
