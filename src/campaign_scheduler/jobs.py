"""Job payloads and ids, as they travel through Redis.

Field names are the specification's camelCase so that a Node.js BullMQ producer or consumer
can share the queues; Python code uses snake_case through pydantic aliases.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, TypeVar

from pydantic import AliasGenerator, BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from .errors import InvalidInput
from .timewindows import ensure_utc

EXECUTION_QUEUE = "campaign-execution"
TIMEOUT_QUEUE = "campaign-timeout"
EXECUTION_JOB = "execute"
TIMEOUT_JOB = "timeout"
RECONCILE_JOB = "reconcile"
RECONCILER_ID = "campaign-reconciler"

_ID_PART = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def check_id_part(name: str, value: str) -> str:
    # A ':' breaks BullMQ's key layout and a number-like id collides with BullMQ's own
    # auto-increment ids (BULLMQ-PYTHON-NOTES 4), so both are refused here, at the edge.
    if not isinstance(value, str) or not _ID_PART.match(value):
        raise InvalidInput(
            f"{name} {value!r} is not a usable id: use 1-100 letters, digits, '_', '.' or '-' "
            "(no ':' and no spaces)"
        )
    return value


def execution_job_id(campaign_id: str, node_id: str, product_user_id: str) -> str:
    job_id = "-".join(
        (
            check_id_part("campaignId", campaign_id),
            check_id_part("nodeId", node_id),
            check_id_part("productUserId", product_user_id),
        )
    )
    return check_job_id(job_id)


def timeout_job_id(campaign_id: str, node_id: str, product_user_id: str) -> str:
    return "timeout-" + execution_job_id(campaign_id, node_id, product_user_id)


def check_job_id(job_id: str) -> str:
    if ":" in job_id:
        raise InvalidInput(f"job id {job_id!r} contains ':': BullMQ keys would be corrupted")
    try:
        float(job_id)
    except ValueError:
        return job_id
    raise InvalidInput(
        f"job id {job_id!r} looks like a number: BullMQ would confuse it with its own ids; "
        "build ids from non-numeric parts"
    )


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
        extra="ignore",
    )

    campaign_id: str
    node_id: str
    user_id: str
    product_user_id: str
    attempts: int = 0

    @field_validator("campaign_id", "node_id", "product_user_id")
    @classmethod
    def _ids(cls, v: str) -> str:
        return check_id_part("id", v)

    def wire(self) -> dict[str, Any]:
        data = self.model_dump(by_alias=True, mode="json")
        return data


class CampaignExecutionJob(_Wire):
    execution_time: datetime
    did_timeout: bool = False

    @field_validator("execution_time")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return ensure_utc(v, "executionTime")

    @property
    def job_id(self) -> str:
        return execution_job_id(self.campaign_id, self.node_id, self.product_user_id)


class CampaignTimeoutJob(_Wire):
    timeout_at: datetime

    @field_validator("timeout_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return ensure_utc(v, "timeoutAt")

    @property
    def job_id(self) -> str:
        return timeout_job_id(self.campaign_id, self.node_id, self.product_user_id)


W = TypeVar("W", bound="_Wire")


def parse_job(model: type[W], data: Any) -> W:
    """Validate a payload from Redis; a malformed one is an InvalidInput naming the fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) + f" ({e['msg']})" for e in exc.errors())
        raise InvalidInput(f"malformed {model.__name__} payload: {fields}") from None
