"""What the broker holds for a topic: the integration tests' check of topic configs."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType


def topic_configs(bootstrap: str, name: str) -> dict[str, str]:
    """The topic's configs set when it was created (the broker's defaults left out)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    finally:
        admin.close()
    return {key: entry["value"] for key, entry in found["topic"][name].items()}
