"""The server: the aiohttp applications (`app`) and the listeners that serve them
(`listen`: connection limits, signals, workers)."""
