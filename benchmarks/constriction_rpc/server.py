"""Serve constriction's coders to processes that cannot load it (an emulated aarch64 root).

    python benchmarks/constriction_rpc/server.py SOCKET      # runs until killed

Each client (the `constriction` package beside this file, put first on a worker's PYTHONPATH
with VAEZIP_CONSTRICTION_RPC=SOCKET) connects once; its coders live here, keyed by id, and
every call runs on this machine's real constriction. Only for the portability benchmark: the
network and numpy then run on the other architecture, the entropy coder does not.
"""

from __future__ import annotations

import sys
import threading
from multiprocessing.connection import Listener

sys.path.remove(sys.path[0])  # this folder holds the stand-in; the server needs the real one
import constriction

AUTHKEY = b"vaezip-constriction-rpc"
_MODELS = constriction.stream.model


def _model(spec):
    kind, args, kwargs = spec
    return getattr(_MODELS, kind)(*args, **kwargs)


def _serve(conn) -> None:
    coders: dict[int, object] = {}
    with conn:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            op, *args = request
            try:
                if op == "new":
                    coder = constriction.stream.stack.AnsCoder(*args)
                    coders[id(coder)] = coder
                    result = id(coder)
                elif op == "clone":
                    coder = coders[args[0]].clone()
                    coders[id(coder)] = coder
                    result = id(coder)
                elif op == "del":
                    coders.pop(args[0], None)
                    result = None
                else:  # a method: (coder id, positional args; a model travels as ("model", spec))
                    key, params = args
                    params = [_model(p[1]) if isinstance(p, tuple) and p[:1] == ("model",) else p for p in params]
                    result = getattr(coders[key], op)(*params)
                conn.send(("ok", result))
            except Exception as exc:  # noqa: BLE001 - re-raised in the client
                conn.send(("error", (type(exc).__name__, str(exc))))


def main(address: str) -> None:
    with Listener(address, family="AF_UNIX", authkey=AUTHKEY) as listener:
        print("listening", flush=True)
        while True:
            threading.Thread(target=_serve, args=(listener.accept(),), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1])
