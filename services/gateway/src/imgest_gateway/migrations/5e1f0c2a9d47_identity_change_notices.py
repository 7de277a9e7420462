"""identity change notices

Revision ID: 5e1f0c2a9d47
Revises: cc52df036ec2
Create Date: 2026-11-27 21:50:00.000000

Every process of the gateway keeps who each token and login session belongs to
(auth.Callers); these triggers tell them all, at commit, that a user, a token, a membership or
a login session changed, whoever changed it.
"""

from alembic import op

revision = '5e1f0c2a9d47'
down_revision = 'cc52df036ec2'
branch_labels = None
depends_on = None

# Row-level, so that a statement changing no row (a sweep of expired sessions that finds
# none) tells no one; PostgreSQL sends the notices of one transaction once. Inserts change no
# one's identity but a membership's. A token's last use is no change either: a write of that
# column alone tells no one. TRUNCATE has statement-level triggers only.
TRIGGERS = {
    "user": "UPDATE OR DELETE",
    "membership": "INSERT OR UPDATE OR DELETE",
    "api_token": "UPDATE OF username, secret_hash, expires_at, revoked_at OR DELETE",
    "login_session": "UPDATE OR DELETE",
}


def upgrade() -> None:
    op.execute("""
        create function gateway.identity_changed() returns trigger language plpgsql as $$
        begin
            perform pg_notify('imgest_identity', tg_table_name);
            return null;
        end $$""")
    for table, events in TRIGGERS.items():
        op.execute(f'create trigger identity_changed after {events} on gateway."{table}" '
                   "for each row execute function gateway.identity_changed()")
        op.execute(f'create trigger identity_truncated after truncate on gateway."{table}" '
                   "for each statement execute function gateway.identity_changed()")


def downgrade() -> None:
    for table in TRIGGERS:
        op.execute(f'drop trigger identity_truncated on gateway."{table}"')
        op.execute(f'drop trigger identity_changed on gateway."{table}"')
    op.execute("drop function gateway.identity_changed()")
