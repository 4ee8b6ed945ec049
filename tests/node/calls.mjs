// Calls usersvc as a Node.js service would: @grpc/grpc-js with the contract loaded from proto/
// at run time. Logs in, creates, gets and lists users, and reads the rich error details of a
// validation failure. Prints one JSON object with what it saw; exits non-zero on any surprise.
//
// Environment: ADDR (host:port), USERSVC_EMAIL, USERSVC_PASSWORD; PROTO_DIR (default ../../proto).
import { randomUUID } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";
import googleProtoFiles from "google-proto-files";

const here = dirname(fileURLToPath(import.meta.url));
const protoDir = process.env.PROTO_DIR ?? join(here, "..", "..", "proto");
const googleDir = googleProtoFiles.getProtoPath("..");

const definition = protoLoader.loadSync(
  ["userservice/v1/user_service.proto", "userservice/v1/auth_service.proto"],
  { includeDirs: [protoDir], keepCase: false, longs: String, enums: String, defaults: true },
);
const { userservice } = grpc.loadPackageDefinition(definition);

// google.rpc.Status and the detail messages, to decode the grpc-status-details-bin trailer.
const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => join(googleDir, target);
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
rpc.resolveAll();

function errorDetails(err) {
  const [raw] = err.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return [];
  const status = rpc.lookupType("google.rpc.Status").decode(raw);
  return status.details.map((any) => {
    const type = rpc.lookupType(any.type_url.split("/").pop());
    return { type: type.fullName.slice(1), ...type.toObject(type.decode(any.value)) };
  });
}

const address = process.env.ADDR ?? "127.0.0.1:50051";
const credentials = grpc.credentials.createInsecure();
const auth = new userservice.v1.AuthService(address, credentials);
const users = new userservice.v1.UserService(address, credentials);
const call = (client, method) => promisify(client[method].bind(client));
const deadline = () => ({ deadline: Date.now() + 10_000 });

const { tokens } = await call(auth, "Login")(
  { email: process.env.USERSVC_EMAIL, password: process.env.USERSVC_PASSWORD },
  new grpc.Metadata(),
  deadline(),
);
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${tokens.accessToken}`);

const email = `node-${randomUUID().slice(0, 8)}@example.com`;
const { user: created } = await call(users, "CreateUser")(
  { email, name: "Node", password: "unusual-pass-4217", requestId: randomUUID() },
  metadata,
  deadline(),
);
const { user: fetched } = await call(users, "GetUser")({ id: created.id }, metadata, deadline());
const listed = await call(users, "ListUsers")({ pageSize: 100 }, metadata, deadline());

let failure;
try {
  const invalid = { email: "nope", name: "A", password: "short" };
  await call(users, "CreateUser")(invalid, metadata, deadline());
  throw new Error("an invalid CreateUser succeeded");
} catch (err) {
  if (err.code !== grpc.status.INVALID_ARGUMENT) throw err;
  failure = { code: err.code, message: err.details, details: errorDetails(err) };
}

auth.close();
users.close();
console.log(JSON.stringify({
  created: { id: created.id, email: created.email, etag: created.etag },
  fetched: { id: fetched.id, email: fetched.email, state: fetched.state },
  listed: listed.users.map((u) => u.id),
  failure,
}));
