"""The server's settings (the CLI's flags), apart from the app so that the CLI can read their defaults without
importing FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    """How the server runs each model (the CLI's flags)."""

    parallel: int = 4  # sequences decoded together per model
    max_queue: int = 32  # requests waiting beyond those, per model, before 503
    prefix_cache_mb: float = 1024  # per model; 0 turns the prefix cache off
    prefill_chunk: int = 256  # prompt tokens per engine step (and the linear-state checkpoint spacing)
    kernels: str = "auto"
    kv_dtype: str = "auto"
    threads: int | None = None
    api_key: str | None = field(default=None, repr=False)  # never in a log line

    def check(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {self.parallel}")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"--prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")
        if self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be >= 1, got {self.prefill_chunk}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
