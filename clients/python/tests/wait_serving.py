"""Waits until a vitals answers grpc.health.v1 Check("") with SERVING.

Usage: python wait_serving.py TARGET PID [TIMEOUT_SECONDS]
Exits 0 once SERVING; 1 if process PID died first or the timeout passed.
Used by run_tests.sh (via clients/testenv.sh) before the tests start.
"""

import os
import sys
import time

import grpc

# grpc.health.v1 without grpcio-health-checking: HealthCheckRequest{service=""}
# encodes to no bytes, and HealthCheckResponse{status=SERVING (1)} to 08 01.
CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited child stays a zombie until the shell reaps it
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main() -> int:
    target, pid = sys.argv[1], int(sys.argv[2])
    deadline = time.monotonic() + float(sys.argv[3] if len(sys.argv) > 3 else 60)
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(CHECK)
        while time.monotonic() < deadline:
            if not alive(pid):
                print(f"wait_serving: vitals (pid {pid}) exited", file=sys.stderr)
                return 1
            try:
                reply = check(b"", timeout=1)
                if reply == SERVING:
                    return 0
                last = f"status bytes {reply.hex()}"
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.1)
    print(f"wait_serving: {target} not SERVING in time ({last})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
