"""agent_released(...): an agent's release after a contact and what routing needs of them, in one statement

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-25 22:40:00.000000

Every call ends by releasing its agent (busy becomes available, or wrap-up) and telling the matcher their state,
capacity and skills. Through the ORM that was a transaction of nine round trips (BEGIN, the tenant setting, the
locked state read, the transition, the audit entry, the profile, the skills, COMMIT), and `sync_agent` (every
state change, registration, missed offer) was six. This function does either in one statement, its own
transaction. It runs as its caller (SECURITY INVOKER), under the tenant's row-level security, and puts back the
caller's tenant setting before it returns.

With `p_release`, an agent who is busy moves to wrap-up (`p_wrap_up`) or available through `agent_transition`,
audited as the system, as `routing.service.set_system_state` audits; any other state stays. Without it, nothing
is written. Either way it returns the agent's state row, profile capacity and skills (skill id -> level).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "agent_released(uuid, uuid, boolean, boolean, timestamptz, text, text)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION agent_released(
            p_tenant uuid, p_user uuid, p_release boolean, p_wrap_up boolean, p_at timestamptz, p_ip text,
            p_request_id text
        )
        RETURNS TABLE (
            r_moved boolean, r_state text, r_since timestamptz, r_voice_registered boolean, r_capacity jsonb,
            r_skills jsonb
        )
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_next text;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            r_moved := false;
            SELECT s.state, s.since, s.voice_registered INTO r_state, r_since, r_voice_registered
            FROM agent_states s WHERE s.tenant_id = p_tenant AND s.user_id = p_user
            FOR UPDATE;
            IF p_release AND r_state = 'busy' THEN
                v_next := CASE WHEN p_wrap_up THEN 'wrap_up' ELSE 'available' END;
                PERFORM agent_transition(p_tenant, p_user, v_next, NULL, p_at);
                INSERT INTO audit_log (tenant_id, id, actor_type, actor_id, action, target_type, target_id, before,
                                       after, ip, request_id)
                VALUES (p_tenant, gen_random_uuid(), 'system', NULL, 'agent_state.change', 'user', p_user::text,
                        jsonb_build_object('state', 'busy', 'reason', NULL),
                        jsonb_build_object('state', v_next, 'reason', NULL), p_ip::inet, p_request_id);
                r_moved := true;
                r_state := v_next;
                r_since := p_at;
            END IF;
            SELECT p.capacity INTO r_capacity
            FROM agent_profiles p WHERE p.tenant_id = p_tenant AND p.user_id = p_user;
            SELECT coalesce(jsonb_object_agg(k.skill_id::text, k.level), '{}'::jsonb) INTO r_skills
            FROM agent_skills k WHERE k.tenant_id = p_tenant AND k.user_id = p_user;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            RETURN NEXT;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
