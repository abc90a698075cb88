"""Bulk import (streamed upload, background job, de-duplication, error report, rerun) and export (masking, formulas)."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import uuid

import pytest
from sqlalchemy import func, select

from backend.customers import importer
from backend.customers.access import viewer_of
from backend.customers.models import Customer, CustomerImportChunk
from backend.db.engine import tenant_transaction
from backend.lib.problems import InvalidInput
from backend.tenants.models import AuditEntry
from tests.factories import unique

pytestmark = pytest.mark.integration

IMPORTS = "/api/v1/customer-imports"


async def _upload(client, ctx, content: bytes, **options) -> dict:
    import_id = await client.post(IMPORTS, json=options, headers=ctx.headers)
    assert import_id.status_code == 201, import_id.text
    response = await client.put(
        f"{IMPORTS}/{import_id.json()['id']}/file", content=content, headers={**ctx.headers, "X-File-Name": "c.csv"}
    )
    return {"id": import_id.json()["id"], "response": response}


async def _import(client, sessionmaker, ctx, content: bytes, **options) -> dict:
    """Upload through the API, then run the job as the worker does; returns the finished import."""
    uploaded = await _upload(client, ctx, content, **options)
    assert uploaded["response"].status_code == 202, uploaded["response"].text
    await importer.run_import(sessionmaker, ctx.tenant_id, uuid.UUID(uploaded["id"]))
    return (await client.get(f"{IMPORTS}/{uploaded['id']}", headers=ctx.headers)).json()


async def _errors(client, ctx, import_id) -> list[dict]:
    response = await client.get(f"{IMPORTS}/{import_id}/errors", headers=ctx.headers)
    assert response.status_code == 200
    return list(csv.DictReader(io.StringIO(response.text)))


async def _customers(sessionmaker, tenant_id) -> int:
    async with tenant_transaction(sessionmaker, tenant_id) as session:
        return int(await session.scalar(select(func.count()).select_from(Customer)) or 0)


async def test_import_creates_updates_reports_and_a_rerun_changes_nothing(client, factory, sessionmaker):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    await factory.customer_field(ctx, key="level", type="choice", choices=["gold", "silver"])
    existing = await factory.customer(ctx, name="Old Name", phones=["+8613800000001"])
    content = (
        b"Name,Phone,E-mail,Tags,level,Notes\n"
        b"Old Name Updated,138 0000 0001,,vip,gold,ignored\n"
        b'"Zhang, Wei",13800000002,zw@example.com,"a;b",silver,"multi\nline"\n'
        b"Li Na,13800000003,bad-address,,gold,\n"
        b"Dup Of Two,+86 138 0000 0002,,,,\n"
        b"Ragged,13800000004\n"
        b"No Keys,,,,,\n"
        b"Bad Choice,13800000005,,,bronze,\n"
        b"\n"
        b",13800000006,,,,\n"
    )
    done = await _import(client, sessionmaker, ctx, content, mapping={}, match_on=["phone", "email"])
    assert done["status"] == "done" and done["percent"] == 100.0
    assert done["mapping"]["Phone"] == "phone" and done["mapping"]["level"] == "custom.level"
    assert (done["rows_done"], done["created"], done["updated"], done["errors"]) == (8, 1, 1, 6)
    errors = await _errors(client, ctx, done["id"])
    by_row = {int(e["row"]): e for e in errors}
    assert set(by_row) == {3, 4, 5, 6, 7, 8}
    assert "e-mail" in by_row[3]["message"]
    assert "duplicates row 2" in by_row[4]["message"]
    assert "2 cells" in by_row[5]["message"]
    assert "to match it on" in by_row[6]["message"]
    assert by_row[7]["field"] == "custom.level"
    assert by_row[8]["field"] == "name"
    assert by_row[4]["line"] == "6"  # the quoted newline in row 2 is counted as a line
    updated = (await client.get(f"/api/v1/customers/{existing['id']}", headers=ctx.headers)).json()
    assert (
        updated["name"] == "Old Name Updated" and updated["tags"] == ["vip"] and updated["custom"] == {"level": "gold"}
    )
    assert updated["version"] == 2
    count = await _customers(sessionmaker, ctx.tenant_id)
    again = await _import(client, sessionmaker, ctx, content, match_on=["phone", "email"])
    assert (again["created"], again["updated"], again["unchanged"], again["errors"]) == (0, 0, 2, 6)
    assert await _customers(sessionmaker, ctx.tenant_id) == count
    assert (await client.get(f"/api/v1/customers/{existing['id']}", headers=ctx.headers)).json()["version"] == 2
    skipped = await _import(client, sessionmaker, ctx, content, mode="skip", match_on=["phone", "email"])
    assert (skipped["skipped"], skipped["created"], skipped["updated"]) == (2, 0, 0)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        entries = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "customers.import"))).all()
        leftover = await session.scalar(select(func.count()).select_from(CustomerImportChunk))
    assert len(entries) == 3  # one per import, not one per row
    assert entries[0].after["created"] + entries[1].after["created"] + entries[2].after["created"] == 1
    assert leftover == 0


async def test_gb18030_files_and_wrong_encodings(client, factory, sessionmaker):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    content = "姓名,电话\n王小明,13912345678\n".encode("gb18030")
    done = await _import(client, sessionmaker, ctx, content, mapping={"姓名": "name", "电话": "phone"})
    assert done["detected_encoding"] == "gb18030" and done["created"] == 1
    found = (await client.get("/api/v1/customers", params={"q": "王小明"}, headers=ctx.headers)).json()["items"]
    assert found[0]["phones"][0]["number"] == "+8613912345678"
    utf8_bom = await _import(client, sessionmaker, ctx, "\ufeffname,phone\n李雷,13912345679\n".encode(), mapping={})
    assert utf8_bom["detected_encoding"] == "utf-8" and utf8_bom["created"] == 1
    wrong = await _upload(client, ctx, content, encoding="utf-8", mapping={"姓名": "name", "电话": "phone"})
    assert wrong["response"].status_code == 422
    assert "not valid utf-8" in wrong["response"].json()["detail"]
    assert (await client.get(f"{IMPORTS}/{wrong['id']}", headers=ctx.headers)).json()["status"] == "awaiting_file"


async def test_headers_are_checked_at_upload(client, factory):
    ctx = await factory.tenant()
    cases = {
        b"": "is empty",
        b"name,,phone\nA,,1\n": "no name",
        b"name,name\nA,B\n": "appears twice",
        b"name,tags\nA,x\n": "cannot be matched",
    }
    for content, message in cases.items():
        uploaded = await _upload(client, ctx, content)
        assert uploaded["response"].status_code == 422, content
        assert message in uploaded["response"].text, uploaded["response"].text
    mapped = await _upload(client, ctx, b"a,b\n1,2\n", mapping={"missing": "phone"})
    assert mapped["response"].status_code == 422
    assert mapped["response"].json()["errors"][0]["field"] == "mapping.missing"
    bad_target = await client.post(IMPORTS, json={"mapping": {"a": "shoe_size"}}, headers=ctx.headers)
    assert bad_target.status_code == 422
    twice = await _upload(client, ctx, b"name,phone\nA,+33142685300\n")
    again = await client.put(f"{IMPORTS}/{twice['id']}/file", content=b"name,phone\n", headers=ctx.headers)
    assert again.status_code == 409


async def test_the_upload_has_its_own_size_limit_and_stores_nothing_beyond(factory, sessionmaker, settings_obj):
    ctx = await factory.tenant()
    small = dataclasses.replace(settings_obj, customer_import_max_bytes=1000, customer_import_chunk_bytes=100)
    import_id = await factory.customer_import(ctx)

    async def body():
        for _ in range(20):
            yield b"name,phone\n" + b"x" * 89

    from backend.customers.importer import PayloadTooLarge

    async def upload() -> None:
        async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
            viewer = await viewer_of(session, ctx.system())
            await importer.receive_file(session, viewer, import_id, body(), small)

    with pytest.raises(PayloadTooLarge):
        await upload()
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        assert await session.scalar(select(func.count()).select_from(CustomerImportChunk)) == 0


async def test_huge_cells_and_rows_are_row_errors_in_small_memory(client, factory, sessionmaker, settings_obj):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    huge = "y" * (10 * 1024 * 1024)
    content = (f'name,phone\nBig,{huge}\n"{huge[:20_000]}",13800000011\nFine,13800000012\n').encode()
    done = await _import(client, sessionmaker, ctx, content)
    assert done["created"] == 1 and done["errors"] == 2
    errors = {int(e["row"]): e["message"] for e in await _errors(client, ctx, done["id"])}
    assert "longer than" in errors[1] and "longer than" in errors[2]


async def test_formula_cells_are_imported_as_text_and_neutralised_on_export(client, factory, sessionmaker):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    content = b"name,phone,tags\n\"=cmd|' /C calc'!A0\",13800000021,@SUM(A1)\n"
    await _import(client, sessionmaker, ctx, content)
    exported = await client.get("/api/v1/customers/export", headers=ctx.headers)
    assert exported.status_code == 200
    rows = list(csv.DictReader(io.StringIO(exported.text.lstrip("\ufeff"))))
    assert rows[0]["name"] == "'=cmd|' /C calc'!A0"
    assert rows[0]["tags"] == "'@SUM(A1)"
    assert rows[0]["phones"] == "+8613800000021"


async def test_export_is_masked_filtered_and_audited(client, factory, sessionmaker):
    ctx = await factory.tenant()
    marker = unique("exp")
    for index in range(3):
        await factory.customer(
            ctx, name=f"{marker} {index}", phones=[f"+86138{index:08d}"], emails=[f"e{index}@example.com"]
        )
    await factory.customer(ctx, name="Not matching")
    exporter = await factory.role(ctx, ["customers:read", "customers:export"])
    user = await factory.user(ctx, role="agent", login=False)
    await client.patch(f"/api/v1/users/{user['id']}", json={"role_id": str(exporter)}, headers=ctx.headers)
    token, _ = await factory.login(ctx.slug, user["email"])
    masked = await client.get(
        "/api/v1/customers/export", params={"q": marker}, headers={"Authorization": f"Bearer {token}"}
    )
    assert masked.status_code == 200, masked.text
    assert masked.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(masked.text.lstrip("\ufeff"))))
    assert len(rows) == 3
    # A masked number starts like a formula (+), so it is neutralised too.
    assert rows[0]["phones"] == "'+86 138****0000" and rows[0]["emails"] == "e***@example.com"
    assert "13800000000" not in masked.text
    full = await client.get(
        "/api/v1/customers/export", params={"q": marker, "encoding": "gb18030"}, headers=ctx.headers
    )
    assert "+8613800000000" in full.content.decode("gb18030")
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        entries = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "customers.export"))).all()
    assert {e.after["masked"] for e in entries} == {True, False}
    assert all(e.after["filters"] == {"q": marker} for e in entries)


async def test_progress_is_readable_while_the_worker_runs_the_job(client, factory, sessionmaker):
    """The API enqueues the job on SAQ; the real worker runs it; progress advances batch by batch."""
    from backend.worker import build_worker

    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    lines = ["name,phone"] + [f"Person {i},+86137{i:08d}" for i in range(3500)]
    uploaded = await _upload(client, ctx, ("\n".join(lines) + "\n").encode())
    assert uploaded["response"].status_code == 202
    assert uploaded["response"].json()["status"] == "queued"
    worker = build_worker()
    task = asyncio.create_task(worker.start())
    seen: list[dict] = []
    try:
        for _ in range(2400):
            progress = (await client.get(f"{IMPORTS}/{uploaded['id']}", headers=ctx.headers)).json()
            if not seen or (progress["rows_done"], progress["status"]) != (seen[-1]["rows_done"], seen[-1]["status"]):
                seen.append(progress)
            if progress["status"] in ("done", "failed"):
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
        task.cancel()
    assert seen[-1]["status"] == "done", seen[-1]
    assert seen[-1]["created"] == 3500
    assert all(p["rows_done"] % 1000 == 0 or p["rows_done"] == 3500 for p in seen)


async def test_an_import_whose_job_was_lost_is_queued_again_and_resumes(client, factory, sessionmaker, app):
    """Redis lost the job (restart, flush): the workers' sweep finds the import in PostgreSQL and queues it again."""
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    lines = ["name,phone"] + [f"Person {i},+86136{i:08d}" for i in range(2500)]
    uploaded = await _upload(client, ctx, ("\n".join(lines) + "\n").encode())
    import_id = uuid.UUID(uploaded["id"])
    queue = app.state.job_queue
    await queue.abort(await queue.job(f"customer-import:{import_id}"), "lost")
    # The first batch went through before the job was lost.
    runner = importer.ImportRunner(sessionmaker, ctx.tenant_id, import_id)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        job = await importer._import(session, import_id, lock=True)
        job.status = "running"

    class Interrupted(Exception):
        pass

    original = runner._write
    calls = 0

    async def write_once(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 1:
            raise Interrupted
        await original(*args, **kwargs)

    runner._write = write_once  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        await runner.run()
    interrupted = (await client.get(f"{IMPORTS}/{import_id}", headers=ctx.headers)).json()
    assert (interrupted["status"], interrupted["rows_done"]) == ("queued", 1000)
    assert interrupted["failure"] == "The import stopped after 1000 rows: Interrupted"
    handed = await importer.requeue_unfinished(sessionmaker, queue)
    assert handed >= 1
    await importer.run_import(sessionmaker, ctx.tenant_id, import_id)
    done = (await client.get(f"{IMPORTS}/{import_id}", headers=ctx.headers)).json()
    assert (done["status"], done["rows_done"], done["created"], done["errors"]) == ("done", 2500, 2500, 0)


async def test_service_refuses_a_mapping_to_unknown_columns_without_http(factory, sessionmaker):
    ctx = await factory.tenant()
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        config = await importer.store_config(session, ctx.tenant_id)
    with pytest.raises(InvalidInput):
        importer.check_header(["a"], {"b": "phone"}, ["phone"], config.rules)
    assert importer.check_header(["Mobile", "Full Name"], {}, ["phone"], config.rules) == {
        "Mobile": "phone",
        "Full Name": "name",
    }


async def test_imported_records_and_contact_points_get_time_ordered_ids(client, factory, sessionmaker):
    """Version-7 ids: a bulk import appends to its indexes' right-hand pages instead of one random page a row."""
    from backend.customers.models import CustomerIdentity

    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    existing = await factory.customer(ctx, name="Had A Phone", phones=["+8613800000101"])
    content = b"name,phone,email\nHad A Phone,13800000101,had@example.com\nNew One,13800000102,new@example.com\n"
    done = await _import(client, sessionmaker, ctx, content, match_on=["phone"])
    assert (done["created"], done["updated"]) == (1, 1)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        created = (await session.scalars(select(Customer.id).where(Customer.name == "New One"))).all()
        contacts = (
            await session.execute(select(CustomerIdentity.customer_id, CustomerIdentity.value, CustomerIdentity.id))
        ).all()
    assert [c.version for c in created] == [7]
    ids = {value: identity for _, value, identity in contacts}
    assert ids["new@example.com"].version == ids["+8613800000102"].version == 7
    assert ids["had@example.com"].version == 7  # added to the existing record by the import
    assert ids["+8613800000101"].version == 4  # written by the API, as before
    assert {str(c) for c, _, _ in contacts} == {existing["id"], str(created[0])}
