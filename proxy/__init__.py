"""flex-proxy: send eligible OpenAI requests on the half-price flex tier, and hide its 429s."""

__version__ = "0.1.0"
