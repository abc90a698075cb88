"""default plans offered at signup

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 23:58:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        INSERT INTO plans (id, code, name, seat_cap, features, public) VALUES
          (gen_random_uuid(), 'trial', 'Trial', 5, ARRAY['voice','webchat'], true),
          (gen_random_uuid(), 'team', 'Team', 25, ARRAY['voice','webchat','wechat','sso'], true),
          (gen_random_uuid(), 'business', 'Business', 250, ARRAY['voice','webchat','wechat','sso','recording'], true)
        ON CONFLICT (code) DO NOTHING
        """
    )


def downgrade() -> None:
    op.execute("DELETE FROM plans WHERE code IN ('trial','team','business')")
