"""OpenAI-compatible serving over the engine (token ids in, token ids out; text lives here)."""
