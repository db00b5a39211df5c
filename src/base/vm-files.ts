/**
 * The files a base's VM spec names (kernel, initrd, NIC option ROM) and their digests: hashed
 * at import, re-hashed by `base verify` and package import, checked to stay inside the base
 * directory on every open (spec/validate.ts confinedFile).
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { specFiles, type SpecFileDigests } from '../spec/validate.js';
import type { VmSpec } from '../spec/vm-spec.js';

export async function hashFile(path: string): Promise<{ sha256: string; size: number }> {
  const h = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(path)) {
    const b = chunk as Buffer;
    size += b.length;
    h.update(b);
  }
  return { sha256: h.digest('hex'), size };
}

/** Re-hashes the spec's files in `dir`; returns the names whose contents differ from `want`. */
export async function changedSpecFiles(dir: string, spec: VmSpec, want: SpecFileDigests): Promise<string[]> {
  const changed: string[] = [];
  for (const f of specFiles(spec)) {
    const got = await hashFile(`${dir}/${f}`).catch(() => undefined);
    const w = want[f];
    if (!got || !w || got.sha256 !== w.sha256 || got.size !== w.size) changed.push(f);
  }
  return changed;
}
