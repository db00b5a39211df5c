/**
 * discover: the reachable cloudlets, best first — from a directory (`serve --directory`),
 * from mDNS/DNS-SD on one interface, or both. Each candidate's round-trip time is measured
 * here (the best of three GET /v1/health); the ranking is: holds the wanted base (by id, id
 * prefix or name), then lower RTT (in 5 ms steps, so jitter does not reorder equals), then
 * more free memory, then more idle CPU.
 */
import { announce as mdnsAnnounce, browse, type Announcement } from '../discovery/mdns.js';
import { UsageError } from '../util/errors.js';
import { CloudletClient, type ClientOptions, type CloudletInfoMessage } from './remote.js';

export interface DiscoverOptions extends ClientOptions {
  /** A directory's URL. */
  directory?: string;
  /** Browse mDNS on the interface with this IPv4 address. */
  mdns?: string;
  mdnsPort?: number;
  /** The base the client needs (id, id prefix or name). */
  base?: string;
  timeoutMs?: number;
}

export interface DiscoveredCloudlet {
  name: string;
  url: string;
  /** Where it was learned of. */
  via: 'directory' | 'mdns';
  has_base: boolean;
  rtt_ms: number | null;
  reachable: boolean;
  mem_free_bytes: number;
  cpus: number;
  load1: number;
  bases: string[];
}

export interface DiscoverResult {
  message_type: 'discover';
  base?: string;
  cloudlets: DiscoveredCloudlet[];
}

function holds(bases: Array<{ id: string; name?: string }>, want: string | undefined): boolean {
  if (!want) return false;
  return bases.some((b) => b.id === want || (want.length >= 6 && b.id.startsWith(want)) || b.name === want);
}

async function rtt(url: string, opts: ClientOptions): Promise<number | null> {
  const c = new CloudletClient(url, { ...opts, timeoutMs: 2000 });
  let best: number | null = null;
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    try {
      await c.health();
      const ms = performance.now() - t0;
      best = best === null ? ms : Math.min(best, ms);
    } catch {
      // unreachable this time
    }
  }
  return best === null ? null : Math.round(best * 100) / 100;
}

/** Orders candidates as the module comment says (pure, unit-tested). */
export function rank(list: DiscoveredCloudlet[]): DiscoveredCloudlet[] {
  const step = (r: number | null): number => (r === null ? Number.POSITIVE_INFINITY : Math.floor(r / 5));
  return [...list].sort(
    (a, b) =>
      Number(b.reachable) - Number(a.reachable) ||
      Number(b.has_base) - Number(a.has_base) ||
      step(a.rtt_ms) - step(b.rtt_ms) ||
      b.mem_free_bytes - a.mem_free_bytes ||
      b.cpus - b.load1 - (a.cpus - a.load1),
  );
}

export async function discover(opts: DiscoverOptions): Promise<DiscoverResult> {
  if (!opts.directory && !opts.mdns) throw new UsageError('say where to look: --directory URL and/or --mdns ADDRESS');
  const found = new Map<string, Omit<DiscoveredCloudlet, 'rtt_ms' | 'reachable'>>();
  if (opts.directory) {
    const d = await new CloudletClient(opts.directory, opts).directory();
    for (const e of d.cloudlets) {
      found.set(e.url, {
        name: e.name,
        url: e.url,
        via: 'directory',
        has_base: holds(e.bases, opts.base),
        mem_free_bytes: e.mem_free_bytes,
        cpus: e.cpus,
        load1: e.load1,
        bases: e.bases.map((b) => b.id),
      });
    }
  }
  if (opts.mdns) {
    for (const a of await browse({ interface: opts.mdns, port: opts.mdnsPort, timeoutMs: opts.timeoutMs ?? 1500 })) {
      if (found.has(a.url)) continue;
      found.set(a.url, {
        name: a.name,
        url: a.url,
        via: 'mdns',
        has_base: holds(
          a.bases.map((id) => ({ id })),
          opts.base,
        ),
        mem_free_bytes: a.memFree,
        cpus: a.cpus,
        load1: a.load,
        bases: a.bases,
      });
    }
  }
  const measured = await Promise.all(
    [...found.values()].map(async (c) => {
      const r = await rtt(c.url, opts);
      return { ...c, rtt_ms: r, reachable: r !== null };
    }),
  );
  return { message_type: 'discover', base: opts.base, cloudlets: rank(measured) };
}

/** mDNS announcement of a cloudlet (for serve): the TXT record from its info. */
export function announceCloudlet(
  info: CloudletInfoMessage,
  options: { interface: string; port?: number },
): { update(info: CloudletInfoMessage): void; stop(): Promise<void> } {
  const of = (i: CloudletInfoMessage): Announcement => ({
    name: i.name,
    url: i.url,
    port: Number(new URL(i.url).port || (i.url.startsWith('https:') ? 443 : 80)),
    bases: i.bases.map((b) => b.id),
    memFree: i.mem_free_bytes,
    cpus: i.cpus,
    load: i.load1,
  });
  const a = mdnsAnnounce(of(info), options);
  return { update: (i) => a.update(of(i)), stop: () => a.stop() };
}
