/**
 * Base package signatures: `base export --sign KEY` writes `<id>/signature.json` into the
 * package; `base import` checks it against the trusted keys before anything is hashed or moved
 * into the library. What is signed: SHA-256 over `cloudlet-overlay base package signature v1\0`
 * followed by the bytes of `<id>/manifest.json` exactly as packaged. The manifest names the base
 * id (which covers every target digest and the VM spec with its kernel and initrd digests) and
 * every file of the base; import rehashes every file against it. So the signature covers every
 * byte of the package that is used.
 */
import { createHash } from 'node:crypto';
import { CorruptInputError } from '../util/errors.js';
import {
  SIG_ALG,
  enforceTrust,
  isKeyId,
  signDigest,
  signatureStatus,
  type SignatureStatus,
  type SigningKey,
  type TrustedKey,
} from '../util/sign.js';

export const SIGNATURE_FILE = 'signature.json';
const DOMAIN = Buffer.from('cloudlet-overlay base package signature v1\0', 'latin1');
/** A signature file is a few hundred bytes. */
export const MAX_SIGNATURE_FILE = 4096;

export interface PackageSignature {
  format: 'cloudlet-overlay-base-signature';
  version: 1;
  alg: 'ed25519';
  key_id: string;
  signer?: string;
  /** SHA-256 of manifest.json (informational: the signature covers the bytes themselves). */
  manifest_sha256: string;
  sig: string;
}

export function manifestDigest(manifest: Buffer): Buffer {
  return createHash('sha256').update(DOMAIN).update(manifest).digest();
}

export function signManifest(manifest: Buffer, key: SigningKey): PackageSignature {
  return {
    format: 'cloudlet-overlay-base-signature',
    version: 1,
    alg: SIG_ALG,
    key_id: key.keyId,
    signer: key.name,
    manifest_sha256: createHash('sha256').update(manifest).digest('hex'),
    sig: signDigest(key, manifestDigest(manifest)),
  };
}

export function parsePackageSignature(bytes: Buffer, where: string): PackageSignature {
  let o: unknown;
  try {
    o = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new CorruptInputError(`${where}: not valid JSON`);
  }
  const s = o as Partial<PackageSignature> | null;
  if (
    typeof s !== 'object' ||
    s === null ||
    s.format !== 'cloudlet-overlay-base-signature' ||
    s.version !== 1 ||
    s.alg !== 'ed25519' ||
    typeof s.key_id !== 'string' ||
    !isKeyId(s.key_id) ||
    typeof s.sig !== 'string' ||
    !/^[0-9a-f]{128}$/.test(s.sig) ||
    typeof s.manifest_sha256 !== 'string' ||
    (s.signer !== undefined && (typeof s.signer !== 'string' || s.signer.length > 256))
  ) {
    throw new CorruptInputError(`${where}: not a base package signature`);
  }
  return s as PackageSignature;
}

/** The signature status without refusing anything (base show). */
export function checkPackageSignature(
  manifest: Buffer,
  sig: PackageSignature | undefined,
  trusted: readonly TrustedKey[],
): SignatureStatus {
  return signatureStatus(sig, () => manifestDigest(manifest), trusted);
}

/** The import's check: refuses per the trust policy (util/sign.ts enforceTrust). */
export function verifyPackageSignature(
  manifest: Buffer,
  sig: PackageSignature | undefined,
  trusted: readonly TrustedKey[],
  what: string,
): SignatureStatus {
  return enforceTrust(checkPackageSignature(manifest, sig, trusted), trusted, what);
}
