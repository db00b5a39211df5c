/**
 * `serve --directory`: a registry of cloudlets that heartbeat to it. Each heartbeat carries the
 * cloudlet's info and a TTL; an entry not refreshed within its TTL is gone. Clients ask for
 * the live entries (optionally those holding a base) and rank them themselves (discover).
 */
import type { CloudletInfoMessage, DirectoryEntry } from '../api/remote.js';

export class Directory {
  private readonly entries = new Map<string, { info: CloudletInfoMessage; seen: number; expires: number }>();

  register(info: CloudletInfoMessage, ttlS: number, now = Date.now()): void {
    this.entries.set(info.name, {
      info: { ...info, message_type: 'cloudlet_info' },
      seen: now,
      expires: now + ttlS * 1000,
    });
  }

  list(base?: string, now = Date.now()): DirectoryEntry[] {
    const out: DirectoryEntry[] = [];
    for (const [name, e] of this.entries) {
      if (e.expires <= now) {
        this.entries.delete(name);
        continue;
      }
      if (base && !e.info.bases.some((b) => b.id === base || b.id.startsWith(base) || b.name === base)) continue;
      out.push({ ...e.info, seen_at: new Date(e.seen).toISOString(), expires_at: new Date(e.expires).toISOString() });
    }
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }
}
