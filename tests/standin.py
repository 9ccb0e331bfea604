"""Stand-in expert servers for client tests: a proxy on loopback in front of a real
`ExpertServer` that adds what the test needs, built on larql.transport's primitives.

- `key=`: the server side of the auth handshake (docs/PROTOCOL.md, `auth`): until step 2
  succeeds only `auth` and `health` pass; anything else gets `unauthorized` and the connection
  is closed. Without a key, `auth` is answered with scheme "none".
- `tls=`: an ssl.SSLContext (transport.server_tls_context) terminating TLS, like fly's handler.
- `mangle=`: a function applied to each reply before it goes back (a broken or hostile shard).
- `pause_mid_reply=`: a function of the request giving seconds (0: none) to wait halfway
  through writing its reply frame (a slow link that leaves a partial frame in the client).
- `wrong_proof=True`: a server that does not hold the key it claims.

Also: test certificates (a CA, a server certificate for 127.0.0.1/localhost, an expired one)
made with the `cryptography` package; `secure_server`, a real `larql serve` child that requires
a key and speaks TLS with them; `client_env`, an environment without the key variables;
`two_shards`, two plain `larql serve` children splitting a vindex's experts.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from larql import protocol as P
from larql import transport
from larql.processes import ServerProcess, free_port


class StandIn:
    def __init__(self, upstream: tuple[str, int], *, key: bytes | None = None, tls=None,
                 mangle: Callable[[dict, dict], dict] | None = None, wrong_proof: bool = False,
                 pause_mid_reply: Callable[[dict], float] | None = None) -> None:
        self.upstream = upstream
        self.pause_mid_reply = pause_mid_reply
        self.key = key
        self.tls = tls
        self.mangle = mangle
        self.wrong_proof = wrong_proof
        self.refused = 0           # connections closed for want of authentication
        self.forwarded = 0         # compute requests passed to the real server
        self.loop = transport.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._client, "127.0.0.1", 0, ssl=tls))
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def address(self) -> str:
        return f"{'tls://' if self.tls else ''}127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def down():
            self.server.close()
            await self.server.wait_closed()

        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        requests: dict[int, dict] = {}
        pump = asyncio.ensure_future(self._replies(up_r, writer, requests))
        authed = self.key is None
        nonces: tuple[bytes, bytes] | None = None
        try:
            while True:
                msg = await read_frame(reader)
                if msg is None:
                    break
                rid, op = msg.get("id"), msg.get("op")
                if op == "auth":
                    if self.key is None:
                        writer.write(P.encode_frame({"id": rid, "ok": True, "scheme": "none"}))
                    elif msg.get("step") == 1:
                        cn, sn = msg.get("nonce", b""), transport.new_nonce()
                        nonces = (cn, sn)
                        proof = transport.auth_proof(self.key, "server", cn, sn)
                        if self.wrong_proof:
                            proof = bytes(32)
                        writer.write(P.encode_frame({"id": rid, "ok": True, "scheme": transport.AUTH_SCHEME,
                                                     "nonce": sn, "proof": proof}))
                    elif (msg.get("step") == 2 and nonces is not None
                          and transport.proof_ok(self.key, "client", *nonces, msg.get("proof"))):
                        authed = True
                        writer.write(P.encode_frame({"id": rid, "ok": True}))
                    else:
                        await self._refuse(writer, rid, "wrong API key")
                        break
                    await writer.drain()
                    continue
                if not authed and op != "health":
                    await self._refuse(writer, rid, "this server requires authentication: set "
                                                    "LARQL_API_KEY or --shard-api-key-file on the client")
                    break
                if op in ("experts", "multi"):
                    self.forwarded += 1
                requests[rid] = msg
                up_w.write(P.encode_frame(msg))
                await up_w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            pump.cancel()
            up_w.close()
            writer.close()

    async def _refuse(self, writer, rid, message: str) -> None:
        self.refused += 1
        writer.write(P.encode_frame(P.error_reply(rid, P.E_UNAUTHORIZED, message)))
        await writer.drain()

    async def _replies(self, up_r, writer, requests: dict[int, dict]) -> None:
        try:
            while (rep := await read_frame(up_r)) is not None:
                req = requests.pop(rep.get("id"), {})
                if self.mangle is not None:
                    rep = self.mangle(req, rep)
                    if rep is None:          # dropped: a server that never answers
                        continue
                frame = P.encode_frame(rep)
                pause = self.pause_mid_reply(req) if self.pause_mid_reply is not None else 0.0
                if pause > 0:
                    writer.write(frame[: len(frame) // 2])
                    await writer.drain()
                    await asyncio.sleep(pause)
                    frame = frame[len(frame) // 2:]
                writer.write(frame)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_frame(reader: asyncio.StreamReader) -> dict | None:
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        return None
    (n,) = P.HEADER.unpack(head)
    return P.decode_body(await reader.readexactly(n))


# ------------------------------------------------------------------------------------------
# Certificates


def make_certs(folder: Path) -> dict[str, Path]:
    """ca.pem; server.pem/server.key (127.0.0.1 and localhost, signed by the CA);
    expired.pem/expired.key (same names, validity over); other_ca.pem (an unrelated CA)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    folder.mkdir(parents=True, exist_ok=True)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str):
        k = key()
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(k.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(k, hashes.SHA256()))
        return k, cert

    def leaf(ca_key, ca_cert, start, end):
        k = key()
        cert = (x509.CertificateBuilder().subject_name(name("larql test server"))
                .issuer_name(ca_cert.subject).public_key(k.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        return k, cert

    def write(stem: str, k, cert) -> None:
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            (folder / f"{stem}.key").write_bytes(k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key, ca_cert = ca("larql test CA")
    write("ca", None, ca_cert)
    day = datetime.timedelta(days=1)
    write("server", *leaf(ca_key, ca_cert, now - day, now + 7 * day))
    write("expired", *leaf(ca_key, ca_cert, now - 30 * day, now - day))
    _, other = ca("some other CA")
    write("other_ca", None, other)
    return {p.stem if p.suffix == ".pem" else p.name: p for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------
# A real expert server as on the internet: API key and TLS


def secure_server(vindex: Path, experts: str, folder: Path, key: str, certs: dict[str, Path]):
    """`larql serve VINDEX --experts EXPERTS` in a child on a free loopback port, requiring `key`
    (--api-key-file) and serving TLS with make_certs' server certificate. Call .wait_ready();
    its shard address is f"tls://127.0.0.1:{srv.port}"."""
    from larql.processes import ServerProcess, free_port

    port = free_port()
    key_file = folder / f"serve-{port}.key"
    key_file.write_text(key + "\n")
    return ServerProcess(vindex, experts, port, folder / f"serve-{port}.log",
                         extra=("--api-key-file", str(key_file), "--tls-cert", str(certs["server"]),
                                "--tls-key", str(certs["server.key"])))


KEY_VARIABLES = ("LARQL_API_KEY", "LARQL_HTTP_API_KEY", "LARQL_TLS_CA")


def client_env(root: Path, **extra: str) -> dict[str, str]:
    """This environment with larql from `root` first on PYTHONPATH and none of the key and CA
    variables unless given in `extra`: what a child sees is only what the test sets."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


@contextmanager
def two_shards(vindex: Path, folder: Path,
               ranges: tuple[str, str] = ("0-3", "4-7")) -> Iterator[tuple[list[ServerProcess], str]]:
    """Two plain `larql serve` children on loopback (1 kernel thread each), one per expert
    range, ready: (servers, the --moe-shards spec). Both are stopped on the way out, whatever
    the test did (stopping one inside is fine: stop() is idempotent)."""
    servers = [ServerProcess(vindex, rng, free_port(), folder / f"s{i}.log", threads=1)
               for i, rng in enumerate(ranges)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers, ",".join(f"{rng}=127.0.0.1:{s.port}" for rng, s in zip(ranges, servers, strict=True))
    finally:
        for s in servers:
            s.stop()
