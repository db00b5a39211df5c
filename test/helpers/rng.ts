/**
 * The tests' seeded randomness: the same seed gives the same sequence on every run, so a
 * failure reproduces. Several tests depend on the exact sequence (sizes, stats thresholds):
 * do not change the algorithm.
 */

/** Deterministic PRNG (mulberry32): uniform in [0, 1). */
export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Text-like bytes, compressible like file contents: `letters` letters from 'a' (default 20). */
export function textish(rand: () => number, n: number, letters = 20): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = 97 + Math.floor(rand() * letters);
  return b;
}
