#!/usr/bin/env python3
"""A tiny matchmaker that talks to a running `roomsched serve` over gRPC.

It generates the Python stubs from the repository's proto/ at run time, then walks through
what a matchmaker does: create a deployment, ask for rooms in a few regions, tell players
where to connect, and destroy the rooms when the matches end. Every step is checked; the
script exits non-zero with a clear message on the first check that fails.

    python matchmaker.py --addr 127.0.0.1:50051
"""
import argparse
import importlib
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
ROOMS_PER_PROCESS = 4
REGIONS = ["Frankfurt", "Tokyo", "London"]


class CheckFailed(Exception):
    pass


def check(ok, message):
    if not ok:
        raise CheckFailed(message)


def log(message):
    print(message, flush=True)


def load_stubs():
    """Compile roomsched.proto into a temporary directory and import the generated modules."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="roomsched-stubs-") as out:
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            str(PROTO_ROOT / "roomsched" / "v1" / "roomsched.proto"),
        ])
        check(rc == 0, f"protoc failed on {PROTO_ROOT} (exit code {rc})")
        sys.path.insert(0, out)
        try:
            return (importlib.import_module("roomsched.v1.roomsched_pb2"),
                    importlib.import_module("roomsched.v1.roomsched_pb2_grpc"))
        finally:
            sys.path.remove(out)


def expect_error(code, call, what):
    """Run `call`, which must fail with the gRPC status `code`."""
    try:
        call()
    except grpc.RpcError as err:
        check(err.code() == code, f"{what}: expected {code.name}, got {err.code().name}: {err.details()}")
        log(f"  {what} -> {code.name} ({err.details()})")
        return
    raise CheckFailed(f"{what}: expected {code.name}, but the call succeeded")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051", help="roomsched server HOST:PORT")
    args = parser.parse_args()

    pb, pb_grpc = load_stubs()
    channel = grpc.insecure_channel(args.addr)
    grpc.channel_ready_future(channel).result(timeout=10)
    deployments = pb_grpc.DeploymentServiceStub(channel)
    rooms = pb_grpc.RoomServiceStub(channel)
    processes = pb_grpc.ProcessServiceStub(channel)

    app = f"py-matchmaker-{uuid.uuid4().hex[:12]}"
    log(f"connected to {args.addr}; app {app}")

    def get_process(process_id):
        return processes.GetProcess(pb.GetProcessRequest(app_id=app, process_id=process_id))

    def check_process(process_id, region, expected_rooms):
        proc = get_process(process_id)
        active = rooms.ListActiveRoomsForProcess(
            pb.ListRoomsForProcessRequest(app_id=app, process_id=process_id)).rooms
        check(proc.region == region, f"process {process_id} is in {proc.region!r}, expected {region!r}")
        check(proc.rooms_allocated == len(active),
              f"process {process_id}: rooms_allocated={proc.rooms_allocated} but "
              f"ListActiveRoomsForProcess returned {len(active)} rooms")
        check(proc.rooms_allocated == expected_rooms,
              f"process {process_id}: rooms_allocated={proc.rooms_allocated}, expected {expected_rooms}")
        status = pb.ProcessStatus.Name(proc.status)
        log(f"  process {process_id[:8]} in {region}: {status}, {proc.rooms_allocated}/"
            f"{proc.rooms_per_process} rooms (matches ListActiveRoomsForProcess)")

    def create_room(region, room_id="", config='{"mode":"duel"}'):
        resp = rooms.CreateRoom(pb.CreateRoomRequest(
            app_id=app, region=region, room_config=config, room_id=room_id))
        check(resp.room_id, f"CreateRoom in {region} returned an empty room_id")
        check(resp.process_id, f"CreateRoom in {region} returned an empty process_id")
        check(resp.status in (pb.ROOM_STATUS_SCHEDULING, pb.ROOM_STATUS_ACTIVE),
              f"room {resp.room_id}: unexpected status {pb.RoomStatus.Name(resp.status)}")
        if resp.status == pb.ROOM_STATUS_ACTIVE:
            check(resp.exposed_port.port, f"room {resp.room_id} is ACTIVE but has no exposed port")
        log(f"  room {resp.room_id} in {region} -> process {resp.process_id[:8]} "
            f"({pb.RoomStatus.Name(resp.status)})")
        return resp

    # 1. A deployment: the game server version, with 4 rooms per process.
    dep = deployments.CreateDeployment(pb.CreateDeploymentRequest(
        app_id=app, rooms_per_process=ROOMS_PER_PROCESS,
        transport_type=pb.TRANSPORT_TYPE_UDP, container_port=7777))
    check(dep.deployment_id == 1, f"first deployment has id {dep.deployment_id}, expected 1")
    log(f"created deployment {dep.deployment_id} ({dep.rooms_per_process} rooms per process)")

    # 2. Four rooms per region: they fill exactly one process in each region.
    created = {}  # room_id -> (region, process_id)
    first_process = {}
    for region in REGIONS:
        log(f"creating {ROOMS_PER_PROCESS} rooms in {region}")
        for _ in range(ROOMS_PER_PROCESS):
            resp = create_room(region)
            check(resp.room_id not in created, f"room id {resp.room_id} was handed out twice")
            created[resp.room_id] = (region, resp.process_id)
            first_process.setdefault(region, resp.process_id)
            check(resp.process_id == first_process[region],
                  f"{region}: room {resp.room_id} went to a second process while the first had free slots")
        check_process(first_process[region], region, ROOMS_PER_PROCESS)

    # 3. A 5th room in Frankfurt does not fit: roomsched starts a second process.
    log("creating a 5th room in Frankfurt (the first process is full)")
    fifth = create_room("Frankfurt")
    created[fifth.room_id] = ("Frankfurt", fifth.process_id)
    check(fifth.process_id != first_process["Frankfurt"],
          "the 5th Frankfurt room was placed on the full process instead of a new one")
    check_process(fifth.process_id, "Frankfurt", 1)

    # 4. Tell players where to connect. Watch one room as a stream, poll the others.
    log(f"watching connection info of room {fifth.room_id}")
    last = None
    for info in rooms.WatchConnectionInfo(
            pb.GetConnectionInfoRequest(app_id=app, room_id=fifth.room_id), timeout=30):
        last = info
        log(f"  stream: {pb.ConnectionStatus.Name(info.status)}")
    check(last is not None and last.status == pb.CONNECTION_STATUS_ACTIVE,
          "WatchConnectionInfo ended without reaching ACTIVE")
    log("waiting until every room is ACTIVE")
    for room_id, (region, process_id) in created.items():
        deadline = time.monotonic() + 30
        while True:
            info = rooms.GetConnectionInfo(pb.GetConnectionInfoRequest(app_id=app, room_id=room_id))
            if info.status == pb.CONNECTION_STATUS_ACTIVE or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        check(info.status == pb.CONNECTION_STATUS_ACTIVE, f"room {room_id} not ACTIVE after 30 s")
        check(info.process_id == process_id, f"room {room_id} moved to process {info.process_id}")
        check(info.exposed_port.host and info.exposed_port.port,
              f"room {room_id} is ACTIVE but has no host/port: {info.exposed_port}")
        check(info.exposed_port.transport_type == pb.TRANSPORT_TYPE_UDP,
              f"room {room_id}: port is {pb.TransportType.Name(info.exposed_port.transport_type)}, "
              "but the deployment says UDP")
        log(f"  {room_id} ({region}): players connect to "
            f"{info.exposed_port.host}:{info.exposed_port.port}")

    # 5. Bad input is refused and changes nothing.
    log("checking errors")
    count = lambda: processes.CountProcesses(pb.CountProcessesRequest(app_id=app)).count
    before = count()
    expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                 lambda: create_room("frankfurt"), "CreateRoom in region 'frankfurt'")
    check(count() == before, "a refused CreateRoom changed the number of processes")

    # 6. A caller-chosen room id makes CreateRoom safe to retry after a timeout.
    match_id = f"match-{uuid.uuid4().hex[:8]}"
    log(f"creating room {match_id} in London, then retrying the same call")
    first = create_room("London", room_id=match_id, config='{"mode":"ranked"}')
    again = create_room("London", room_id=match_id, config='{"mode":"ranked"}')
    check(again.room_id == match_id, f"retry returned room id {again.room_id!r}")
    check(again.process_id == first.process_id,
          f"retry returned process {again.process_id}, first call gave {first.process_id}")
    created[match_id] = ("London", first.process_id)
    check_process(first.process_id, "London", 1)  # the retry took no second slot
    expect_error(grpc.StatusCode.ALREADY_EXISTS,
                 lambda: create_room("London", room_id=match_id, config='{"mode":"casual"}'),
                 "CreateRoom with the same id and another config")

    # 7. Matches end: destroy every room; the processes are empty again.
    log(f"destroying {len(created)} rooms")
    for room_id in created:
        rooms.DestroyRoom(pb.DestroyRoomRequest(app_id=app, room_id=room_id))
    for process_id, region in sorted({(p, r) for r, p in created.values()}):
        check_process(process_id, region, 0)
    expect_error(grpc.StatusCode.NOT_FOUND,
                 lambda: rooms.DestroyRoom(pb.DestroyRoomRequest(app_id=app, room_id=match_id)),
                 "DestroyRoom again")
    gone = rooms.GetRoom(pb.GetRoomRequest(app_id=app, room_id=match_id))
    check(gone.status == pb.ROOM_STATUS_DESTROYED,
          f"destroyed room reads back as {pb.RoomStatus.Name(gone.status)}")
    log("PASS: all checks succeeded")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as err:
        sys.exit(f"FAIL: {err}")
    except grpc.RpcError as err:
        sys.exit(f"FAIL: unexpected gRPC error {err.code().name}: {err.details()}")
    except grpc.FutureTimeoutError:
        sys.exit("FAIL: could not connect to the roomsched server within 10 s")
