"""Realistic large Nova RPC payloads, for checking that the limits on a
body (docs/envelope.md) refuse none of them at the default message size.

Each builder returns the largest payload of its kind whose msgpack body
stays under `size` bytes.
"""
import json
import uuid

import msgpack


def instance(i):
    """An instance as Nova's conductor and compute services pass it around:
    about 70 fields, a flavor, metadata and a network info cache."""
    u = str(uuid.UUID(int=i))
    network_info = [{"id": str(uuid.UUID(int=i + 7)), "address": f"fa:16:3e:{i % 256:02x}:00:01",
                     "type": "ovs", "devname": f"tap{u[:11]}", "active": True,
                     "network": {"id": str(uuid.UUID(int=i + 9)), "bridge": "br-int",
                                 "label": "private",
                                 "subnets": [{"cidr": "10.0.0.0/24", "gateway": {"address": "10.0.0.1"},
                                              "ips": [{"address": f"10.0.{i % 250}.{i % 200 + 2}",
                                                       "type": "fixed", "floating_ips": []}],
                                              "dns": [{"address": "10.0.0.2"}]}]}}]
    flavor = {"id": 3, "name": "m1.medium", "memory_mb": 4096, "vcpus": 2, "root_gb": 40,
              "ephemeral_gb": 0, "swap": 0, "flavorid": "3", "rxtx_factor": 1.0,
              "is_public": True, "extra_specs": {"hw:cpu_policy": "shared"}}
    return {
        "uuid": u, "id": i, "name": f"vm-{i}", "display_name": f"web-{i}",
        "display_description": "web server", "hostname": f"web-{i}", "host": f"compute-{i % 40}",
        "node": f"compute-{i % 40}.example.org", "launched_on": f"compute-{i % 40}",
        "user_id": "5f1c0a3e2b9d4e7f8a6b5c4d3e2f1a0b", "project_id": "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d",
        "image_ref": str(uuid.UUID(int=i + 3)), "kernel_id": "", "ramdisk_id": "",
        "instance_type_id": 3, "memory_mb": 4096, "vcpus": 2, "root_gb": 40, "ephemeral_gb": 0,
        "vm_state": "active", "task_state": None, "power_state": 1, "locked": False,
        "locked_by": None, "created_at": "2026-11-24T05:30:00.000000",
        "updated_at": "2026-11-24T06:00:00.000000", "launched_at": "2026-11-24T05:31:12.000000",
        "terminated_at": None, "deleted_at": None, "deleted": 0, "cleaned": False,
        "availability_zone": "nova", "key_name": "ops", "key_data": "ssh-rsa " + "A" * 372,
        "config_drive": "", "access_ip_v4": None, "access_ip_v6": None,
        "architecture": "x86_64", "os_type": "linux", "root_device_name": "/dev/vda",
        "default_ephemeral_device": None, "default_swap_device": None, "progress": 100,
        "reservation_id": f"r-{u[:8]}", "launch_index": 0, "auto_disk_config": False,
        "shutdown_terminate": False, "disable_terminate": False, "cell_name": None,
        "ephemeral_key_uuid": None, "vm_mode": None, "user_data": None,
        "metadata": {"role": "web", "tier": "frontend", "owner": "team-a"},
        "system_metadata": {f"image_{k}": v for k, v in (
            ("min_ram", "0"), ("min_disk", "40"), ("disk_format", "qcow2"),
            ("container_format", "bare"), ("base_image_ref", str(uuid.UUID(int=i + 3))),
            ("os_distro", "debian"), ("hw_disk_bus", "virtio"), ("hw_vif_model", "virtio"))},
        "flavor": flavor, "info_cache": {"network_info": json.dumps(network_info)},
        "security_groups": [{"name": "default", "description": "default",
                             "rules": [{"protocol": "tcp", "from_port": 22, "to_port": 22,
                                        "cidr": "0.0.0.0/0"}]}],
        "pci_devices": [], "tags": ["web", "prod"], "numa_topology": None,
    }


def _fill(size, make):
    """The longest list [make(0), make(1), ...] whose message fits `size`."""
    one = len(msgpack.packb(make(0)))
    items = [make(i) for i in range(max(1, size // one))]
    while len(body([{"method": "x", "args": {"items": items}}])) > size:
        items = items[:int(len(items) * 0.98)]
    return items


def body(message_and_context):
    (message,) = message_and_context
    return msgpack.packb([{"user_id": "u", "project_id": "p", "request_id": "req-1"}, message],
                         use_bin_type=True)


def payloads(size, names=None):
    """name -> a request body of at most `size` bytes; only those in
    `names`, if given (each takes a while to build)."""
    def host_stats():
        nodes = len(_fill(size, lambda i: [f"compute-{i}.example.org",
                                            {"vcpus": 64, "memory_mb": 262144,
                                             "local_gb": 2000, "running_vms": 1,
                                             "cpu_info": "x86_64 EPYC"}]))
        return {"method": "update_available_resource", "args": {
            "items": {f"compute-{i}.example.org": {"vcpus": 64, "memory_mb": 262144,
                                                    "local_gb": 2000, "running_vms": i % 50,
                                                    "cpu_info": "x86_64 EPYC"}
                      for i in range(nodes)}}}
    makers = {
        "instances": lambda: {"method": "sync_instances",
                              "args": {"items": _fill(size, instance)}},
        "host stats by node": host_stats,
        "console log": lambda: {"method": "get_console_output",
                                "args": {"items": "log line\n" * ((size - 200) // 9)}},
        "image bytes": lambda: {"method": "upload", "args": {"items": b"\x00" * (size - 200)}},
        "instance ids": lambda: {"method": "refresh",
                                 "args": {"items": _fill(size, lambda i: 100000 + i)}},
    }
    return {name: body([make()]) for name, make in makers.items()
            if names is None or name in names}
