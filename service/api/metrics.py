"""``/metrics``: the app's Prometheus metrics in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import AppStateDep
from service.api.openapi import AUTH_ERRORS, v1_errors
from service.auth import METRICS

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {
                "text/plain": {
                    "schema": {"type": "string"},
                    "example": '# TYPE tta_streams gauge\ntta_streams{model="cifar10_resnet20"} 1',
                }
            },
        },
        **v1_errors(*AUTH_ERRORS),
    },
    dependencies=[METRICS],
)
async def metrics(state: AppStateDep) -> Response:
    """Every metric of this app (its own registry); with authentication on, an admin or metrics
    key is needed unless ``public_metrics``."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
