/**
 * `serve`: run a cloudlet (or, with `directory`, a directory of cloudlets) until stopped —
 * listen (TLS when given a certificate), announce over mDNS on one interface when asked,
 * heartbeat to a directory when given one. Instances outlive the server (they are detached):
 * a restarted server finds them in the library and keeps their ports.
 */
import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { announceCloudlet } from '../api/discover.js';
import { CloudletClient, readToken } from '../api/remote.js';
import { resolveLauncherKind, type LauncherChoice } from '../api/launcher.js';
import { UsageError } from '../util/errors.js';
import { TokenFile } from './auth.js';
import { parsePortRange, type PortRange } from './ports.js';
import { buildServer, type CloudletServer, type ServerConfig } from './server.js';

export interface ServeOptions {
  root: string;
  /** HOST:PORT ([v6]:PORT too). */
  listen: string;
  tokenFile: string;
  tlsCert?: string;
  tlsKey?: string;
  maxUpload: number;
  maxSyntheses: number;
  /** FIRST-LAST */
  ports: string;
  launcher: LauncherChoice;
  directory: boolean;
  /** Default: the host name. */
  name?: string;
  /** The URL clients use (default: from the listen address; the host name when listening on any). */
  advertise?: string;
  /** A directory to heartbeat to, and the token for it (else $CLOUDLET_DIRECTORY_TOKEN). */
  register?: string;
  registerTokenFile?: string;
  heartbeatS: number;
  /** Announce over mDNS on the interface with this IPv4 address. */
  mdns?: string;
  mdnsPort?: number;
  readyTimeoutMs: number;
  log?: (line: string) => void;
}

export interface Serving {
  message: { message_type: 'serve'; url: string; name: string; mode: 'cloudlet' | 'directory'; launcher: string };
  server: CloudletServer;
  close(): Promise<void>;
}

export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:]+)\]|([^:\s]+)):(\d{1,5})$/.exec(s.trim());
  const port = Number(m?.[3]);
  if (!m || port > 65535) throw new UsageError(`--listen must be HOST:PORT, not ${s}`);
  return { host: m[1] ?? m[2]!, port };
}

export async function serveCloudlet(o: ServeOptions): Promise<Serving> {
  const { host, port: listenPort } = parseListen(o.listen);
  const ports: PortRange = parsePortRange(o.ports);
  if (!!o.tlsCert !== !!o.tlsKey) throw new UsageError('TLS needs both --tls-cert and --tls-key');
  const tokens = await TokenFile.open(o.tokenFile);
  const tls = o.tlsCert && o.tlsKey ? { cert: await readFile(o.tlsCert), key: await readFile(o.tlsKey) } : undefined;
  const scheme = tls ? 'https' : 'http';
  const name = (o.name ?? hostname()).replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '') || 'cloudlet';
  const launcher = o.directory ? 'qemu' : await resolveLauncherKind(o.launcher);
  let url = o.advertise;
  const cfg: ServerConfig = {
    root: o.root,
    name,
    url: url ?? `${scheme}://${host}:${listenPort}`,
    tokens,
    maxUpload: o.maxUpload,
    maxSyntheses: o.maxSyntheses,
    ports,
    forwardHost: host === '0.0.0.0' || host === '::' ? '0.0.0.0' : host,
    launcher,
    readyTimeoutMs: o.readyTimeoutMs,
    directory: o.directory,
    tls,
    log: o.log,
  };
  const server = await buildServer(cfg);
  await server.app.listen({ host: host, port: listenPort });
  const addr = server.app.server.address();
  const port = addr && typeof addr === 'object' ? addr.port : listenPort;
  const shownHost = host === '0.0.0.0' || host === '::' ? hostname() : host;
  url ??= `${scheme}://${shownHost.includes(':') ? `[${shownHost}]` : shownHost}:${port}`;
  // The advertised URL is only known once the port is (listen on port 0 in tests).
  cfg.url = url;
  const infoNow = (): ReturnType<CloudletServer['info']> => server.info();

  const stops: Array<() => Promise<void>> = [];
  if (o.mdns && !o.directory) {
    const a = announceCloudlet(await infoNow(), { interface: o.mdns, port: o.mdnsPort });
    const t = setInterval(() => void infoNow().then((i) => a.update(i)), 5000);
    t.unref();
    stops.push(async () => {
      clearInterval(t);
      await a.stop();
    });
  }
  if (o.register && !o.directory) {
    const token = o.registerTokenFile
      ? await readToken(o.registerTokenFile)
      : process.env['CLOUDLET_DIRECTORY_TOKEN'] || (await readToken());
    const dir = new CloudletClient(o.register, { token, timeoutMs: 5000 });
    const beat = async (): Promise<void> => {
      await dir.heartbeat(await infoNow(), o.heartbeatS * 3).catch((err: unknown) => {
        o.log?.(`heartbeat to ${o.register} failed: ${(err as Error).message}`);
      });
    };
    await beat();
    const t = setInterval(() => void beat(), o.heartbeatS * 1000);
    t.unref();
    stops.push(async () => clearInterval(t));
  }
  return {
    message: { message_type: 'serve', url, name, mode: o.directory ? 'directory' : 'cloudlet', launcher },
    server,
    async close() {
      for (const s of stops) await s();
      await server.app.close();
    },
  };
}
