"""Serving a trained policy: :class:`Policy` (robot observations -> named absolute actions, with history and
execution helpers) and the websocket server (:mod:`vla_foundry_jax.serving.server`)."""

from vla_foundry_jax.serving.policy import Execution, ObservationError, Policy, Session, StepResult

__all__ = ["Execution", "ObservationError", "Policy", "Session", "StepResult"]
