"""openai-forward: a fast, transparent forwarding gateway for the OpenAI API."""

__version__ = "1.0.0.dev0"
