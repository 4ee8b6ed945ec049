"""Server reflection, v1 and v1alpha.

grpcio-reflection (1.85) implements only grpc.reflection.v1alpha. The v1 protocol is the same
protocol under another package name, message for message and field for field, so the same
servicer answers both; a copy of the v1alpha file renamed to v1 makes v1 describable too.
The google.rpc error details are in the default descriptor pool (imported below), so a client
can look them up by name through reflection to decode error details.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (registers them)
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name = _V1_FILE
    proto.package = new
    proto.options.Clear()
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(f".{old}."):
                f.type_name = f".{new}." + f.type_name.removeprefix(f".{old}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{new}." + method.input_type.removeprefix(f".{old}.")
            method.output_type = f".{new}." + method.output_type.removeprefix(f".{old}.")
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for `service_names` (and for itself) on both protocol versions."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
