/**
 * Overlay signatures (format 1.1, docs/FORMAT.md "Signature"): pure functions over the header
 * JSON bytes, for every reader (random access: reader.ts; streaming) and the writer.
 *
 * What is signed: SHA-256 over `cloudlet-overlay header signature v1\0` followed by the header
 * JSON exactly as stored, with the 128 hex digits of `signature.sig` replaced by zeros. The
 * header names the base id, every target with its digest, and `index_sha256`; the index names
 * every segment's SHA-256. So one signature covers every byte a reader rebuilds from, and a
 * streaming reader can check it as soon as the header has arrived, and authenticate the
 * segments once the index has.
 *
 * Policy: with no trusted key configured, nothing is refused (an unsigned overlay is fine, a
 * signature cannot be checked). With any trusted key, an unsigned overlay, one signed by a key
 * not trusted, or a signature that does not verify is an UntrustedError.
 */
import { createHash } from 'node:crypto';
import { CorruptInputError } from '../util/errors.js';
import {
  SIG_ALG,
  SIG_HEX,
  enforceTrust,
  signDigest,
  signatureStatus,
  type SignatureStatus,
  type SigningKey,
  type TrustedKey,
} from '../util/sign.js';

export type { SignatureStatus } from '../util/sign.js';
import type { HeaderSignature, OverlayHeader } from './format.js';

const DOMAIN = Buffer.from('cloudlet-overlay header signature v1\0', 'latin1');
/** The placeholder of `signature.sig` while a header is written and signed. */
export const ZERO_SIG = '0'.repeat(SIG_HEX);
/** The placeholder of `index_sha256` until the index is written. */
export const ZERO_SHA256 = '0'.repeat(64);
const SIG_KEY = Buffer.from('"sig":"', 'latin1');

/** The signature block a writer puts in the header before signing (sig = zeros). */
export function signatureDraft(key: SigningKey): HeaderSignature {
  return { alg: SIG_ALG, key_id: key.keyId, signer: key.name, sig: ZERO_SIG };
}

/**
 * Where the signature's hex sits in the JSON: the one `"sig":"` followed by 128 hex digits and
 * a quote. A JSON string cannot hold an unescaped quote, so only a key can look like this; more
 * than one such key makes the signed bytes ambiguous and is refused.
 */
function sigOffset(json: Buffer): number {
  let found = -1;
  for (let at = json.indexOf(SIG_KEY); at >= 0; at = json.indexOf(SIG_KEY, at + 1)) {
    const start = at + SIG_KEY.length;
    const hex = json.subarray(start, start + SIG_HEX).toString('latin1');
    if (/^[0-9a-f]{128}$/.test(hex) && json[start + SIG_HEX] === 0x22) {
      if (found >= 0) throw new CorruptInputError('header: more than one signature value');
      found = start;
    }
  }
  if (found < 0) throw new CorruptInputError('header: signature block without a signature value');
  return found;
}

/** The digest an overlay's signature signs (FORMAT.md): the header JSON with the sig zeroed. */
export function headerDigest(json: Buffer): Buffer {
  const at = sigOffset(json);
  const zeroed = Buffer.from(json);
  zeroed.write(ZERO_SIG, at, 'latin1');
  return createHash('sha256').update(DOMAIN).update(zeroed).digest();
}

/**
 * Signs header JSON that carries `signatureDraft(key)` (and its final digests and index_sha256):
 * the same bytes with the sig filled in, same length.
 */
export function signHeader(json: Buffer, key: SigningKey): Buffer {
  const at = sigOffset(json);
  const sig = signDigest(key, headerDigest(json));
  const out = Buffer.from(json);
  out.write(sig, at, 'latin1');
  return out;
}

/** Checks the signature against the trusted keys without refusing anything (for `info`). */
export function checkHeaderSignature(
  json: Buffer,
  header: OverlayHeader,
  trusted: readonly TrustedKey[],
): SignatureStatus {
  // Without index_sha256 the signature would not cover the segments: never good enough.
  return signatureStatus(header.signature, () => headerDigest(json), trusted, header.index_sha256 !== undefined);
}

/**
 * The reader's check, right after the header is parsed and before anything else happens:
 * refuses (UntrustedError) when trusted keys are configured and the overlay is unsigned, signed
 * by another key, or badly signed. Returns what was found.
 */
export function verifyHeaderSignature(
  json: Buffer,
  header: OverlayHeader,
  trusted: readonly TrustedKey[],
  what = 'overlay',
): SignatureStatus {
  return enforceTrust(checkHeaderSignature(json, header, trusted), trusted, what);
}

/**
 * Checks the index as stored (its 48-byte frame header and its frame, whole or in pieces, in
 * order) against the header's `index_sha256` (1.1). A 1.0 header has none: nothing to check (a
 * signature without it was refused already).
 */
export function checkIndexHash(header: OverlayHeader, index: Buffer | readonly Buffer[]): void {
  if (header.index_sha256 === undefined) return;
  const h = createHash('sha256');
  for (const part of Buffer.isBuffer(index) ? [index] : index) h.update(part);
  const got = h.digest('hex');
  if (got !== header.index_sha256) {
    throw new CorruptInputError("index: does not match the header's index_sha256 (damaged or spliced file)", {
      expected: header.index_sha256,
      actual: got,
    });
  }
}
