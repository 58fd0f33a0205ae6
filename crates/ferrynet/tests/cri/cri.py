#!/usr/bin/env python3
"""A CRI client for ferrynet's tests and benchmark, over containerd's CRI gRPC API (v1).

Uses PyPI's `container-runtime-interface-api` (its generated CRI v1 stubs) on grpcio, installed
by `scripts/deps.sh test`. Every command prints one JSON document on stdout; a failed gRPC call
exits 1 with `{"error": CODE, "message": ...}`, so callers can tell a refused RunPodSandbox from
a broken helper.

    cri.py image OUT.tar NAME                 an OCI image archive of a pause process (busybox)
    cri.py --sock S version | ready           Version | Status (RuntimeReady, NetworkReady)
    cri.py --sock S run NAME [--namespace NS] [--uid U] [--port HOST:CONTAINER[/PROTO][@HOSTIP]]
                             [--annotation K=V] [--handler H]   RunPodSandbox, then its status
    cri.py --sock S status ID                 PodSandboxStatus (verbose: pid, netns)
    cri.py --sock S stop ID | rm ID           StopPodSandbox | RemovePodSandbox
    cri.py --sock S ls                        ListPodSandbox
"""

import argparse
import hashlib
import io
import json
import sys
import tarfile
import uuid

# The pause process: PID 1 of the sandbox, sleeping until a signal ends it. PID 1 of a PID
# namespace ignores signals it has no handler for, hence the trap.
PAUSE_CMD = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"

# A RunPodSandbox includes the CNI ADD; containerd's own timeout for it is longer than ours.
CALL_TIMEOUT = 120


def _tar_add(tar, name, data=None, mode=0o755, symlink=None, directory=False):
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    elif symlink is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = symlink
        info.mode = 0o777
        tar.addfile(info)
    else:
        info.size = len(data)
        info.mode = mode
        tar.addfile(info, io.BytesIO(data))


def _blob(tar, data):
    digest = hashlib.sha256(data).hexdigest()
    _tar_add(tar, f"blobs/sha256/{digest}", data, mode=0o644)
    return f"sha256:{digest}", len(data)


def build_image(out, name, busybox="/bin/busybox"):
    """Write an OCI image layout archive (one layer: busybox and its sh/sleep applets) whose
    index names the image `name`, for `ctr images import`."""
    with open(busybox, "rb") as f:
        bb = f.read()
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        _tar_add(layer, "bin", directory=True)
        _tar_add(layer, "bin/busybox", bb)
        for applet in ("sh", "sleep"):
            _tar_add(layer, f"bin/{applet}", symlink="busybox")
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sh", "-c", PAUSE_CMD], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        layer_digest, layer_size = _blob(tar, layer_bytes)
        cfg_digest, cfg_size = _blob(tar, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest,
                "size": cfg_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        }
        man_digest, man_size = _blob(tar, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": man_digest,
                    "size": man_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"io.containerd.image.name": name},
                }
            ],
        }
        _tar_add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644)
        _tar_add(tar, "index.json", json.dumps(index).encode(), 0o644)
    return {"image": name, "archive": out}


class Cri:
    """A CRI v1 RuntimeService client on containerd's socket."""

    def __init__(self, sock):
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc

        self.grpc = grpc
        self.pb = api_pb2
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)

    def version(self):
        v = self.rt.Version(self.pb.VersionRequest(), timeout=CALL_TIMEOUT)
        return {"runtime": v.runtime_name, "version": v.runtime_version, "api": v.runtime_api_version}

    def pod_config(self, name, namespace="default", uid=None, ports=(), annotations=None):
        pb = self.pb
        protos = {"tcp": pb.TCP, "udp": pb.UDP, "sctp": pb.SCTP}
        mappings = []
        for spec in ports:
            # HOST:CONTAINER[/PROTO][@HOSTIP]
            spec, _, host_ip = spec.partition("@")
            spec, _, proto = spec.partition("/")
            host, _, cont = spec.partition(":")
            mappings.append(
                pb.PortMapping(
                    protocol=protos[(proto or "tcp").lower()],
                    host_port=int(host),
                    container_port=int(cont),
                    host_ip=host_ip,
                )
            )
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name=name, namespace=namespace, uid=uid or str(uuid.uuid4()), attempt=0
            ),
            hostname=name,
            port_mappings=mappings,
            annotations=annotations or {},
            labels={"app": name},
            linux=pb.LinuxPodSandboxConfig(),
        )

    def run(self, config, handler=""):
        r = self.rt.RunPodSandbox(
            self.pb.RunPodSandboxRequest(config=config, runtime_handler=handler),
            timeout=CALL_TIMEOUT,
        )
        return r.pod_sandbox_id

    def ready(self):
        """The runtime's conditions (RuntimeReady, NetworkReady) as {type: [status, reason]}."""
        r = self.rt.Status(self.pb.StatusRequest(), timeout=CALL_TIMEOUT)
        return {c.type: [c.status, c.reason + (": " + c.message if c.message else "")] for c in r.status.conditions}

    def status(self, pod_id):
        r = self.rt.PodSandboxStatus(
            self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True),
            timeout=CALL_TIMEOUT,
        )
        s = r.status
        net = s.network
        ips = ([net.ip] if net.ip else []) + [a.ip for a in net.additional_ips]
        info = json.loads(r.info.get("info", "{}") or "{}")
        netns = ""
        for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network":
                netns = ns.get("path", "")
        return {
            "id": s.id,
            "name": s.metadata.name,
            "namespace": s.metadata.namespace,
            "state": self.pb.PodSandboxState.Name(s.state),
            "ips": ips,
            "pid": info.get("pid", 0),
            "netns": netns,
        }

    def stop(self, pod_id):
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
        return {"stopped": pod_id}

    def remove(self, pod_id):
        self.rt.RemovePodSandbox(
            self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT
        )
        return {"removed": pod_id}

    def list(self):
        r = self.rt.ListPodSandbox(self.pb.ListPodSandboxRequest(), timeout=CALL_TIMEOUT)
        return [
            {"id": p.id, "name": p.metadata.name, "state": self.pb.PodSandboxState.Name(p.state)}
            for p in r.items
        ]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sock", help="containerd's gRPC socket")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("image")
    p.add_argument("out")
    p.add_argument("name")
    p.add_argument("--busybox", default="/bin/busybox")
    sub.add_parser("version")
    sub.add_parser("ready")
    p = sub.add_parser("run")
    p.add_argument("name")
    p.add_argument("--namespace", default="default")
    p.add_argument("--uid")
    p.add_argument("--port", action="append", default=[])
    p.add_argument("--annotation", action="append", default=[])
    p.add_argument("--handler", default="", help="runtime handler (containerd runtime name)")
    for c in ("status", "stop", "rm"):
        sub.add_parser(c).add_argument("id")
    sub.add_parser("ls")
    a = ap.parse_args(argv)

    if a.cmd == "image":
        print(json.dumps(build_image(a.out, a.name, a.busybox)))
        return 0
    if not a.sock:
        ap.error("--sock is required")
    import grpc

    cri = Cri(a.sock)
    try:
        if a.cmd == "version":
            out = cri.version()
        elif a.cmd == "run":
            ann = dict(kv.split("=", 1) for kv in a.annotation)
            cfg = cri.pod_config(a.name, a.namespace, a.uid, a.port, ann)
            out = cri.status(cri.run(cfg, a.handler))
        elif a.cmd == "ready":
            out = cri.ready()
        elif a.cmd == "status":
            out = cri.status(a.id)
        elif a.cmd == "stop":
            out = cri.stop(a.id)
        elif a.cmd == "rm":
            out = cri.remove(a.id)
        else:
            out = cri.list()
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "message": e.details()}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
