"""Sensors, one file per sensor."""
