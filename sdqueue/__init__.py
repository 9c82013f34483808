"""sdqueue: a queue-driven Stable Diffusion service (rq on Redis, warm diffusers workers, S3)."""

__version__ = "0.1.0"
