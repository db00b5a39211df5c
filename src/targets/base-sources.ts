/**
 * How a worker thread opens the base's bytes for itself: a plain description of where each
 * base target lives (workers share no handles with the main thread), and the opener.
 */
import { openDisk } from '../image/disk/open-disk.js';
import { openRamFile } from '../image/memory/ram-file.js';
import { openMemorySnapshot, type MemorySnapshot } from '../image/memory/snapshot.js';
import type { DecodeBaseTarget } from '../delta/segment-decode.js';
import type { ChunkedKind } from '../delta/target.js';

/** Where one base target's bytes are. */
export type BaseSourceSpec =
  | { kind: 'disk'; name: string; size: number; path: string; format: string }
  | { kind: 'ram-file'; name: string; size: number; path: string }
  | { kind: 'ram-stream'; name: string; size: number; path: string }
  | { kind: 'blob'; name: string; size: number; bytes: Uint8Array };

export interface OpenedBase {
  targets: DecodeBaseTarget[];
  close(): Promise<void>;
}

export async function openBaseSources(specs: readonly BaseSourceSpec[]): Promise<OpenedBase> {
  const closers: Array<() => Promise<void>> = [];
  const snapshots = new Map<string, MemorySnapshot>();
  try {
    const targets: DecodeBaseTarget[] = [];
    for (const s of specs) {
      if (s.kind === 'blob') {
        targets.push({ kind: 'blob', name: s.name, size: s.size, blob: Buffer.from(s.bytes) });
        continue;
      }
      const kind: ChunkedKind = s.kind === 'disk' ? 'disk' : 'ram';
      if (s.kind === 'disk') {
        const d = await openDisk(s.path, { format: s.format, name: s.name });
        closers.push(() => d.close());
        targets.push({ kind, name: s.name, size: s.size, source: d });
      } else if (s.kind === 'ram-file') {
        const f = await openRamFile(s.path, s.name);
        closers.push(() => f.close());
        targets.push({ kind, name: s.name, size: s.size, source: f });
      } else {
        let snap = snapshots.get(s.path);
        if (!snap) {
          snap = await openMemorySnapshot(s.path);
          snapshots.set(s.path, snap);
          const opened = snap;
          closers.push(() => opened.close());
        }
        targets.push({ kind, name: s.name, size: s.size, source: snap.block(s.name) });
      }
    }
    return { targets, close: async () => void (await Promise.allSettled(closers.map((c) => c()))) };
  } catch (err) {
    await Promise.allSettled(closers.map((c) => c()));
    throw err;
  }
}
