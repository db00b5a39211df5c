/**
 * Host ports for the port forwards of synthesized VMs, from a configured range. Concurrent
 * requests never get the same port: a port is taken in this process (synchronously, before
 * any await) and only then probed by binding it, so two requests cannot both pick it; one that
 * something else on the host holds is skipped. Ports are given back when the synthesis fails or
 * the instance is stopped; `reconcile` also frees the ports of instances that died on their own.
 */
import { createServer } from 'node:net';
import { BusyError, UsageError } from '../util/errors.js';

export interface PortRange {
  first: number;
  last: number;
}

export function parsePortRange(s: string): PortRange {
  const m = /^(\d{1,5})-(\d{1,5})$/.exec(s.trim());
  const first = Number(m?.[1]);
  const last = Number(m?.[2]);
  if (!m || first < 1024 || last > 65535 || first > last) {
    throw new UsageError(`port range must be FIRST-LAST within 1024-65535, not ${s}`);
  }
  return { first, last };
}

function bindable(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen({ host, port, exclusive: true }, () => s.close(() => resolve(true)));
  });
}

export class PortAllocator {
  /** port → owner (an instance id, or a pending request's tag) */
  private readonly taken = new Map<number, string>();
  private next: number;

  constructor(
    readonly range: PortRange,
    readonly host: string,
  ) {
    this.next = range.first;
  }

  get inUse(): number {
    return this.taken.size;
  }

  /** `n` ports for `owner`, each reserved here and probed free on the host. */
  async allocate(n: number, owner: string): Promise<number[]> {
    const got: number[] = [];
    const size = this.range.last - this.range.first + 1;
    try {
      for (let tries = 0; got.length < n && tries < size; tries++) {
        const p = this.next;
        this.next = p >= this.range.last ? this.range.first : p + 1;
        if (this.taken.has(p)) continue;
        this.taken.set(p, owner); // before the await: no other request can pick it now
        if (await bindable(this.host, p)) got.push(p);
        else this.taken.delete(p);
      }
      if (got.length < n) {
        throw new BusyError(`no free host port left in ${this.range.first}-${this.range.last}`, { http_status: 503 });
      }
      return got;
    } catch (err) {
      for (const p of got) this.taken.delete(p);
      throw err;
    }
  }

  /** Hands the ports of `from` (a pending tag) to `to` (the instance id). */
  rename(from: string, to: string): void {
    for (const [p, o] of this.taken) if (o === from) this.taken.set(p, to);
  }

  /** Marks ports as held (instances found running at start). */
  hold(ports: number[], owner: string): void {
    for (const p of ports) this.taken.set(p, owner);
  }

  release(owner: string): void {
    for (const [p, o] of this.taken) if (o === owner) this.taken.delete(p);
  }

  /** Frees the ports of owners that are no longer alive (`alive` lists instance ids). */
  reconcile(alive: Set<string>, pendingPrefix = 'pending-'): void {
    for (const [p, o] of this.taken) if (!o.startsWith(pendingPrefix) && !alive.has(o)) this.taken.delete(p);
  }

  owners(): Map<number, string> {
    return new Map(this.taken);
  }
}
