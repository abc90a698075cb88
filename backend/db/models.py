"""Imports every domain's tables so that metadata (and Alembic) sees the whole schema."""

from backend.auth import models as auth_models
from backend.channels.voice import models as voice_models
from backend.customers import models as customer_models
from backend.db.base import Base
from backend.routing import models as routing_models
from backend.tenants import models as tenant_models

metadata = Base.metadata

__all__ = ["auth_models", "customer_models", "metadata", "routing_models", "tenant_models", "voice_models"]
