/** Argument parsers for commander options. */
import { InvalidArgumentError } from 'commander';
import type { PortForward } from '../api/types.js';

export function intArg(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError('expected a non-negative integer');
  return n;
}

/** A thread count: 1 or more (1: everything on the main thread). */
export function threadsArg(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 1 || n > 256) throw new InvalidArgumentError('expected a thread count 1..256');
  return n;
}

/**
 * A port forward: QEMU's hostfwd syntax `tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`, or the
 * short `HOSTPORT:GUESTPORT` (host side on 127.0.0.1).
 */
export function forwardArg(value: string, previous: PortForward[] = []): PortForward[] {
  let m = value.match(/^tcp:([^:]*):(\d+)-[^:]*:(\d+)$/);
  if (m) return [...previous, { hostAddr: m[1] || '127.0.0.1', hostPort: Number(m[2]), guestPort: Number(m[3]) }];
  m = value.match(/^(\d+):(\d+)$/);
  if (m) return [...previous, { hostAddr: '127.0.0.1', hostPort: Number(m[1]), guestPort: Number(m[2]) }];
  throw new InvalidArgumentError('expected tcp:127.0.0.1:HOSTPORT-:GUESTPORT or HOSTPORT:GUESTPORT');
}

export function durationArg(value: string): number {
  const m = value.match(/^(\d+(?:\.\d+)?)(ms|s|m)?$/);
  if (!m) throw new InvalidArgumentError('expected a duration like 30s, 500ms or 2m');
  const n = Number(m[1]);
  return Math.round(m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000);
}

/** A byte count: 123, 64K, 512M, 4G, 1T (powers of 1024). */
export function bytesArg(value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError('expected a size like 4G, 512M or 1048576');
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[(m[2] ?? '').toUpperCase() as '' | 'K'];
  return Math.floor(Number(m[1]) * mult);
}
/** A repeatable option's values, in order. */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** A size in bytes: 1048576, 512K, 64M, 2G, 1T (binary units). */
export function sizeArg(value: string): number {
  const m = value.match(/^(\d+)([KMGT]i?B?)?$/i);
  if (!m) throw new InvalidArgumentError('expected a size like 500M, 2G or a number of bytes');
  const unit = (m[2] ?? '').charAt(0).toUpperCase();
  const n = Number(m[1]) * 1024 ** (unit ? 'KMGT'.indexOf(unit) + 1 : 0);
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError('size out of range');
  return n;
}

/** The help text of --qemu-arg (launch, synthesize). */
export const QEMU_ARG_HELP =
  'add one raw argument to the QEMU command line (repeatable, e.g. --qemu-arg=-device --qemu-arg=virtio-rng-pci); ' +
  'an operator option on this host only, never stored in a base or passed on by a snapshot';
