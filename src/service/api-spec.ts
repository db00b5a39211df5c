/**
 * The API's contract in one table: every route with its JSON schemas. The server validates
 * requests with these schemas (fastify/ajv) and serves the OpenAPI document built from the same
 * table (openapi.ts), which docs/openapi.json must equal (a test checks). Every string a
 * request can carry into the server has a pattern here: ids, names, URLs, paths.
 */

/** A base: 64 hex digits, a unique id prefix (≥ 6), or a name of letters, digits, `._-`. */
export const BASE_REF = '^(?:[0-9a-f]{6,64}|[A-Za-z0-9](?:[A-Za-z0-9_-]|\\.(?!\\.)){0,63})$';
export const INSTANCE_ID = '^i-[0-9a-z]{1,32}$';
/** What to call an uploaded overlay (a label only, never a path). */
export const OVERLAY_NAME = '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$';
/** The guest path to wait for: an absolute URL path, no `..`, no spaces or control bytes. */
export const WAIT_PATH = "^/(?!.*\\.\\.)[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,511}$";
/** An overlay the cloudlet fetches itself: http(s), or glance://IMAGE_ID. */
export const OVERLAY_URL = '^(?:https?://[^\\s]{1,2040}|glance://[0-9a-fA-F-]{8,64})$';
export const CLOUDLET_NAME = '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$';

type Schema = Record<string, unknown>;

export interface RouteSpec {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  /** fastify syntax (`:id`); OpenAPI gets `{id}`. */
  url: string;
  operationId: string;
  summary: string;
  /** Needs a bearer token (everything but health). */
  auth: boolean;
  /** Only in `serve --directory` mode. */
  directory?: boolean;
  params?: Schema;
  querystring?: Schema;
  /** JSON body schema, and/or an octet-stream upload. */
  body?: Schema;
  upload?: string;
  responses: Record<string, { description: string; schema?: Schema; text?: boolean }>;
}

const error: Schema = { $ref: '#/components/schemas/Error' };
const errors = (...codes: number[]): RouteSpec['responses'] => {
  const out: RouteSpec['responses'] = {};
  const what: Record<number, string> = {
    400: 'bad request (UsageError): a field fails its pattern, or a bad value',
    401: 'no bearer token, or not an accepted one (UnauthorizedError); WWW-Authenticate: Bearer',
    404: 'no such base or instance (NotFoundError)',
    409: 'overlay for another base (BaseMismatchError), or busy (BusyError)',
    413: 'upload larger than --max-upload (UsageError), refused before or while streaming',
    422: 'corrupt or truncated overlay, digest mismatch, unsupported input',
    429: 'the cloudlet is at --max-syntheses (BusyError); Retry-After says when to try again',
    502: 'QEMU failed or a URL could not be fetched (QemuError, NetworkError)',
    503: 'no free host port in --ports, or a tool is missing',
    504: 'the guest did not answer in time (TimeoutError)',
  };
  for (const c of codes) out[String(c)] = { description: what[c] ?? 'error', schema: error };
  return out;
};

const instanceId: Schema = {
  type: 'object',
  required: ['id'],
  additionalProperties: false,
  properties: { id: { type: 'string', pattern: INSTANCE_ID } },
};

const forward: Schema = {
  type: 'object',
  properties: { hostAddr: { type: 'string' }, hostPort: { type: 'integer' }, guestPort: { type: 'integer' } },
};

const synthesizeAnswer: Schema = {
  type: 'object',
  required: ['message_type', 'instance', 'base_id', 'forwards', 'endpoints'],
  properties: {
    message_type: { const: 'synthesize' },
    instance: { type: 'string' },
    base_id: { type: 'string' },
    pid: { type: 'integer' },
    accel: { type: 'string' },
    launcher: { type: 'string', enum: ['qemu', 'libvirt'] },
    domain: { type: 'string', description: 'the libvirt domain (launcher libvirt)' },
    forwards: { type: 'array', items: forward },
    endpoints: {
      type: 'array',
      items: { type: 'object', properties: { guestPort: { type: 'integer' }, url: { type: 'string' } } },
    },
    answer: {
      type: 'object',
      description: "the guest's first HTTP answer, when wait_path was given",
      properties: { status: { type: 'integer' }, body: { type: 'string' } },
    },
    guest_thaw: {
      type: 'string',
      enum: ['thawed', 'not-frozen', 'no-agent'],
      description: 'bases with a guest agent channel: whether the resumed guest had to be thawed (snapshot --freeze)',
    },
    timings_ms: { type: 'object', additionalProperties: { type: 'number' } },
  },
};

const guestPorts: Schema = {
  type: 'array',
  minItems: 1,
  maxItems: 8,
  uniqueItems: true,
  items: { type: 'integer', minimum: 1, maximum: 65535 },
};

const cloudletInfo: Schema = {
  type: 'object',
  required: ['name', 'url', 'bases'],
  properties: {
    message_type: { const: 'cloudlet_info' },
    name: { type: 'string', pattern: CLOUDLET_NAME },
    url: { type: 'string', pattern: '^https?://[^\\s]{1,2040}$' },
    version: { type: 'string', maxLength: 64 },
    bases: {
      type: 'array',
      maxItems: 1000,
      items: {
        type: 'object',
        required: ['id'],
        properties: { id: { type: 'string', pattern: '^[0-9a-f]{64}$' }, name: { type: 'string', maxLength: 64 } },
      },
    },
    mem_free_bytes: { type: 'number', minimum: 0 },
    mem_total_bytes: { type: 'number', minimum: 0 },
    cpus: { type: 'integer', minimum: 0 },
    load1: { type: 'number', minimum: 0 },
    syntheses_running: { type: 'integer', minimum: 0 },
    max_syntheses: { type: 'integer', minimum: 0 },
    launcher: { type: 'string', maxLength: 16 },
  },
};

export const ROUTES: readonly RouteSpec[] = [
  {
    method: 'GET',
    url: '/v1/health',
    operationId: 'health',
    summary: 'Liveness; needs no token (clients also time it to measure round trips)',
    auth: false,
    responses: { '200': { description: 'up', schema: { type: 'object' } } },
  },
  {
    method: 'GET',
    url: '/v1/openapi.json',
    operationId: 'openapi',
    summary: 'This OpenAPI document',
    auth: true,
    responses: { '200': { description: 'OpenAPI 3.1 document', schema: { type: 'object' } }, ...errors(401) },
  },
  {
    method: 'GET',
    url: '/v1/info',
    operationId: 'info',
    summary: 'What the cloudlet holds and has free: bases, memory, CPU, syntheses in flight',
    auth: true,
    responses: { '200': { description: 'cloudlet_info', schema: cloudletInfo }, ...errors(401) },
  },
  {
    method: 'GET',
    url: '/v1/bases',
    operationId: 'listBases',
    summary: 'The base library (as `base list --json`)',
    auth: true,
    responses: { '200': { description: 'base_list', schema: { type: 'object' } }, ...errors(401) },
  },
  {
    method: 'GET',
    url: '/v1/bases/:ref',
    operationId: 'showBase',
    summary: 'One base (as `base show --json`)',
    auth: true,
    params: {
      type: 'object',
      required: ['ref'],
      additionalProperties: false,
      properties: { ref: { type: 'string', pattern: BASE_REF } },
    },
    responses: { '200': { description: 'base_show', schema: { type: 'object' } }, ...errors(400, 401, 404) },
  },
  {
    method: 'POST',
    url: '/v1/bases',
    operationId: 'importBase',
    summary: 'Import a base package (from `base export`): uploaded, or fetched from a URL',
    auth: true,
    upload: 'a base package (tar), streamed to a temporary file in the library and verified before it lands',
    body: {
      type: 'object',
      required: ['url'],
      additionalProperties: false,
      properties: { url: { type: 'string', pattern: '^https?://[^\\s]{1,2040}$' } },
    },
    responses: {
      '201': { description: 'base_import', schema: { type: 'object' } },
      ...errors(400, 401, 413, 422, 502),
    },
  },
  {
    method: 'POST',
    url: '/v1/instances',
    operationId: 'synthesize',
    summary:
      'Synthesize a VM: an uploaded overlay (application/octet-stream, streamed into the pipeline, never ' +
      'buffered whole; parameters in the query) or one the cloudlet fetches (application/json). The cloudlet ' +
      "picks the host ports; the answer names them and carries the guest's first answer",
    auth: true,
    upload: 'the overlay file',
    querystring: {
      type: 'object',
      additionalProperties: false,
      properties: {
        base: { type: 'string', pattern: BASE_REF },
        guest_port: guestPorts,
        wait_path: { type: 'string', pattern: WAIT_PATH },
        name: { type: 'string', pattern: OVERLAY_NAME },
      },
    },
    body: {
      type: 'object',
      required: ['base', 'overlay_url', 'guest_ports'],
      additionalProperties: false,
      properties: {
        base: { type: 'string', pattern: BASE_REF },
        overlay_url: { type: 'string', pattern: OVERLAY_URL },
        guest_ports: guestPorts,
        wait_path: { type: 'string', pattern: WAIT_PATH },
        name: { type: 'string', pattern: OVERLAY_NAME },
      },
    },
    responses: {
      '201': { description: 'synthesize: the VM runs and answered', schema: synthesizeAnswer },
      ...errors(400, 401, 404, 409, 413, 422, 429, 502, 503, 504),
    },
  },
  {
    method: 'GET',
    url: '/v1/instances',
    operationId: 'listInstances',
    summary: 'Instances (as `ps --json`)',
    auth: true,
    responses: { '200': { description: 'ps', schema: { type: 'object' } }, ...errors(401) },
  },
  {
    method: 'GET',
    url: '/v1/instances/:id',
    operationId: 'showInstance',
    summary: 'One instance: status, forwards, launcher, libvirt domain',
    auth: true,
    params: instanceId,
    responses: { '200': { description: 'instance', schema: { type: 'object' } }, ...errors(400, 401, 404) },
  },
  {
    method: 'DELETE',
    url: '/v1/instances/:id',
    operationId: 'stopInstance',
    summary: 'Stop an instance (QMP quit, then kill), remove it, free its host ports',
    auth: true,
    params: instanceId,
    responses: { '200': { description: 'stop', schema: { type: 'object' } }, ...errors(400, 401, 404) },
  },
  {
    method: 'GET',
    url: '/v1/instances/:id/logs',
    operationId: 'instanceLogs',
    summary: "An instance's serial console log, or QEMU's own messages (source=qemu)",
    auth: true,
    params: instanceId,
    querystring: {
      type: 'object',
      additionalProperties: false,
      properties: { source: { type: 'string', enum: ['serial', 'qemu'] } },
    },
    responses: { '200': { description: 'logs', schema: { type: 'object' } }, ...errors(400, 401, 404) },
  },
  {
    method: 'PUT',
    url: '/v1/directory/cloudlets/:name',
    operationId: 'heartbeat',
    summary: 'Directory mode: a cloudlet registers or refreshes itself (its info, with ttl_s)',
    auth: true,
    directory: true,
    params: {
      type: 'object',
      required: ['name'],
      additionalProperties: false,
      properties: { name: { type: 'string', pattern: CLOUDLET_NAME } },
    },
    body: {
      ...cloudletInfo,
      properties: {
        ...(cloudletInfo['properties'] as Schema),
        ttl_s: { type: 'integer', minimum: 1, maximum: 3600 },
      },
    },
    responses: { '200': { description: 'registered', schema: { type: 'object' } }, ...errors(400, 401) },
  },
  {
    method: 'GET',
    url: '/v1/directory/cloudlets',
    operationId: 'directory',
    summary: 'Directory mode: the cloudlets whose last heartbeat is within its TTL (optionally: holding a base)',
    auth: true,
    directory: true,
    querystring: {
      type: 'object',
      additionalProperties: false,
      properties: { base: { type: 'string', pattern: BASE_REF } },
    },
    responses: { '200': { description: 'directory', schema: { type: 'object' } }, ...errors(400, 401) },
  },
];

/** The OpenAPI 3.1 document of these routes. */
export function openApiDocument(version: string): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of ROUTES) {
    const path = r.url.replace(/:([A-Za-z_]+)/g, '{$1}');
    const parameters: unknown[] = [];
    for (const [where, schema] of [
      ['path', r.params],
      ['query', r.querystring],
    ] as const) {
      const props = (schema?.['properties'] ?? {}) as Record<string, Schema>;
      const required = (schema?.['required'] ?? []) as string[];
      for (const [name, s] of Object.entries(props)) {
        parameters.push({ name, in: where, required: where === 'path' || required.includes(name), schema: s });
      }
    }
    const content: Record<string, unknown> = {};
    if (r.body) content['application/json'] = { schema: r.body };
    if (r.upload)
      content['application/octet-stream'] = { schema: { type: 'string', format: 'binary', description: r.upload } };
    const op: Record<string, unknown> = {
      operationId: r.operationId,
      summary: r.summary,
      ...(r.directory ? { tags: ['directory'] } : {}),
      ...(r.auth ? {} : { security: [] }),
      ...(parameters.length ? { parameters } : {}),
      ...(Object.keys(content).length ? { requestBody: { required: true, content } } : {}),
      responses: Object.fromEntries(
        Object.entries(r.responses).map(([code, x]) => [
          code,
          {
            description: x.description,
            ...(x.schema ? { content: { 'application/json': { schema: x.schema } } } : {}),
          },
        ]),
      ),
    };
    paths[path] = { ...paths[path], [r.method.toLowerCase()]: op };
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'cloudlet-overlay',
      version,
      description:
        'VM synthesis as a service: a cloudlet rebuilds a customized VM from a base it holds and an overlay, ' +
        'resumes it, and says where it answers. See docs/service.md.',
    },
    servers: [{ url: '/' }],
    security: [{ bearer: [] }],
    paths,
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
      schemas: {
        Error: {
          type: 'object',
          required: ['message_type', 'code', 'exit_code', 'message'],
          properties: {
            message_type: { const: 'error' },
            code: { type: 'string', description: 'the error class, as in the CLI (docs/cli.md)' },
            exit_code: { type: 'integer', description: 'the exit code the CLI would have given' },
            message: { type: 'string' },
          },
          additionalProperties: true,
        },
      },
    },
  };
}
