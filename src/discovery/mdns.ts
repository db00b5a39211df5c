/**
 * DNS-SD over multicast DNS (RFC 6762/6763) for cloudlets: a cloudlet answers queries for
 * `_cloudlet._tcp.local` with PTR, SRV, TXT and A records; a client asks and collects the
 * answers for a while. The TXT record carries what a client needs to choose a cloudlet (its
 * API URL, the bases it holds, free memory and CPU). Built on multicast-dns (the packet
 * layer bonjour-service itself uses), because we must choose the interface: multicast goes out
 * on the one interface named, never on "all of them" by default.
 */
import makeMdns from 'multicast-dns';
import type { StringAnswer, TxtAnswer, SrvAnswer } from 'dns-packet';

export const SERVICE = '_cloudlet._tcp.local';

/** What a cloudlet announces (TXT keys in parentheses). */
export interface Announcement {
  /** Instance name (the DNS-SD instance label). */
  name: string;
  /** The API's base URL (url). */
  url: string;
  port: number;
  /** Base ids held (base, one TXT string each). */
  bases: string[];
  /** Free memory in bytes (mem_free). */
  memFree: number;
  /** CPUs (cpus) and 1-minute load average (load). */
  cpus: number;
  load: number;
}

export interface MdnsOptions {
  /** IPv4 address of the interface to use (e.g. 127.0.0.1 in a test namespace). */
  interface: string;
  /** Default 5353 (tests may pick another). */
  port?: number;
}

/** The TXT strings of an announcement (each ≤ 255 bytes; at most 16 bases fit a datagram well). */
export function txtOf(a: Announcement): string[] {
  return [
    'v=1',
    `url=${a.url}`,
    `mem_free=${a.memFree}`,
    `cpus=${a.cpus}`,
    `load=${a.load.toFixed(2)}`,
    ...a.bases.slice(0, 16).map((b) => `base=${b}`),
  ];
}

/** Parses TXT strings back (unknown keys ignored; `base` may repeat). */
export function parseTxt(name: string, port: number, txt: string[]): Announcement | undefined {
  const kv = new Map<string, string>();
  const bases: string[] = [];
  for (const t of txt) {
    const i = t.indexOf('=');
    if (i <= 0) continue;
    const k = t.slice(0, i);
    const v = t.slice(i + 1);
    if (k === 'base') {
      if (/^[0-9a-f]{64}$/.test(v)) bases.push(v);
    } else kv.set(k, v);
  }
  const url = kv.get('url');
  if (!url || !/^https?:\/\/[^\s]+$/.test(url)) return undefined;
  return {
    name,
    url,
    port,
    bases,
    memFree: Number(kv.get('mem_free') ?? 0) || 0,
    cpus: Number(kv.get('cpus') ?? 0) || 0,
    load: Number(kv.get('load') ?? 0) || 0,
  };
}

function label(name: string): string {
  return name.replace(/[^A-Za-z0-9-]/g, '-').slice(0, 63) || 'cloudlet';
}

/** Answers `_cloudlet._tcp.local` queries until stop(); `update` changes what is announced. */
export function announce(
  initial: Announcement,
  options: MdnsOptions,
): { update(a: Announcement): void; stop(): Promise<void> } {
  const m = makeMdns({ interface: options.interface, bind: '0.0.0.0', port: options.port ?? 5353, loopback: true });
  m.on('error', () => undefined);
  m.on('warning', () => undefined);
  let current = initial;
  const answers = (): { answers: StringAnswer[]; additionals: Array<SrvAnswer | TxtAnswer | StringAnswer> } => {
    const inst = `${label(current.name)}.${SERVICE}`;
    const host = `${label(current.name)}.local`;
    return {
      answers: [{ name: SERVICE, type: 'PTR', ttl: 120, data: inst }],
      additionals: [
        { name: inst, type: 'SRV', ttl: 120, data: { port: current.port, target: host } },
        { name: inst, type: 'TXT', ttl: 120, data: txtOf(current) },
        { name: host, type: 'A', ttl: 120, data: options.interface },
      ],
    };
  };
  m.on('query', (q) => {
    if (
      q.questions.some((x) => x.name.toLowerCase() === SERVICE && (x.type === 'PTR' || (x.type as string) === 'ANY'))
    ) {
      m.respond(answers());
    }
  });
  m.on('ready', () => m.respond(answers()));
  return {
    update(a) {
      current = a;
    },
    stop: () => new Promise<void>((resolve) => m.destroy(() => resolve())),
  };
}

/** Asks for `_cloudlet._tcp.local` (three times) and returns what answered within timeoutMs. */
export async function browse(options: MdnsOptions & { timeoutMs?: number }): Promise<Announcement[]> {
  const m = makeMdns({ interface: options.interface, bind: '0.0.0.0', port: options.port ?? 5353, loopback: true });
  m.on('error', () => undefined);
  m.on('warning', () => undefined);
  const found = new Map<string, Announcement>();
  m.on('response', (r) => {
    const records = [...r.answers, ...(r.additionals ?? [])];
    for (const ptr of records) {
      if (ptr.type !== 'PTR' || ptr.name.toLowerCase() !== SERVICE) continue;
      const inst = String(ptr.data);
      const srv = records.find((x): x is SrvAnswer => x.type === 'SRV' && x.name === inst);
      const txt = records.find((x): x is TxtAnswer => x.type === 'TXT' && x.name === inst);
      if (!srv || !txt) continue;
      const strings = (Array.isArray(txt.data) ? txt.data : [txt.data]).map((b) => String(b));
      const a = parseTxt(inst.slice(0, -(SERVICE.length + 1)), srv.data.port, strings);
      if (a) found.set(a.url, a);
    }
  });
  const ask = (): void => m.query({ questions: [{ name: SERVICE, type: 'PTR' }] });
  const timeoutMs = options.timeoutMs ?? 1500;
  await new Promise<void>((resolve) => m.once('ready', () => resolve()));
  ask();
  const timers = [setTimeout(ask, timeoutMs / 3), setTimeout(ask, (2 * timeoutMs) / 3)];
  await new Promise((r) => setTimeout(r, timeoutMs));
  timers.forEach(clearTimeout);
  await new Promise<void>((resolve) => m.destroy(() => resolve()));
  return [...found.values()];
}
