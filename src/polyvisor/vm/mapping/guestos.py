"""Guest operating system identifiers across hypervisors, as one table.

Each :class:`OsRow` is one operating system (or a generic family / distribution
entry) with its identifier in every scheme polyvisor speaks:

* ``osinfo`` — the libosinfo short id and ``osinfo_url`` its full id, as in
  libosinfo's osinfo-db (``data/os/<vendor>/<os>.xml.in``, e.g.
  ``microsoft.com/win-2k19.xml.in``: short-id ``win2k19``, id
  ``http://microsoft.com/win/2k19``; checked against Debian 12's osinfo-db
  0.20221130 and the upstream repository for the newer debian12 / win2k25);
* ``vmx`` / ``vmx32`` — VMware's ``guestOS`` value in a .vmx file for the
  64-bit and 32-bit flavour; the vSphere API form (``debian11_64Guest``)
  comes from :data:`VMX_TO_VIM`.  Both from open-vm-tools
  ``lib/include/guest_os_tables.h`` (``GUEST_OS_KEY_MAP``: ``GOKM(vmxKey,
  vimKey, reversible)``) and VMware's ``VirtualMachineGuestOsIdentifier``
  enum reference (developer.broadcom.com, vSphere API 8.0) for the newer
  ``debian12_64Guest``, ``windows11_64Guest``, ``windows2022srvNext_64Guest``;
* ``cim`` / ``cim32`` — the DMTF ``CIM_OperatingSystem.OsType`` number used
  as OVF ``OperatingSystemSection/@ovf:id`` (DMTF CIM schema; the values as
  listed in VirtualBox ``src/VBox/Main/include/ovfreader.h`` ``CIMOSType_T``:
  36 LINUX, 78 FreeBSD 64, 79/80 RHEL, 93/94 Ubuntu, 95/96 Debian, 101
  "Linux 64-Bit", 102 "Other 64-Bit", 103 Windows Server 2008 R2, 105
  Windows 7, 106/107 CentOS, 108/109 Oracle Linux, 112 Server 2012, 113/114
  Windows 8, 115 Server 2012 R2, 116/117 Windows 8.1, 118 Server 2016,
  119/120 Windows 10).  CIM has no numbers for Windows 11 or Server
  2019/2022/2025; polyvisor writes the closest older number and relies on
  the vendor id (``vmw:osType``) next to it;
* ``proxmox`` — Proxmox VE ``ostype`` (qemu-server ``PVE/QemuServer.pm``
  ``os_list_description`` and the ``qm.conf`` manual: ``other, wxp, w2k,
  w2k3, w2k8, wvista, win7, win8, win10, win11, l24, l26, solaris``);
* ``vbox`` / ``vbox32`` — VirtualBox OS type ids (``VBoxManage list
  ostypes``; VirtualBox ``src/VBox/Main/src-all/Global.cpp`` ``sOSTypes``).

A ``None`` cell means "no specific id": the lookup falls back along
*exact row → same distribution and major version → distribution's generic
row → family's generic row → "other"*.  Reverse lookups (native id → model)
take the **first** row carrying that id, so generic rows come first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from polyvisor.vm.model import Arch, GuestOS, OsFamily

L, W, B, S, O = OsFamily.LINUX, OsFamily.WINDOWS, OsFamily.FREEBSD, OsFamily.SOLARIS, OsFamily.OTHER  # noqa: E741


@dataclass(frozen=True)
class OsRow:
    """One operating system's identifiers; see the module docstring for the columns."""

    osinfo: str | None
    family: OsFamily
    distribution: str | None
    version: str | None
    vmx: str | None = None
    vmx32: str | None = None
    cim: int | None = None
    cim32: int | None = None
    proxmox: str | None = None
    vbox: str | None = None
    vbox32: str | None = None
    osinfo_url: str | None = None


# Generic rows first (reverse lookups take the first match), then specific releases.
OS_TABLE: tuple[OsRow, ...] = (
    # family-wide generic rows
    OsRow(None, O, None, None, "other-64", "other", 102, 1, "other", "Other_64", "Other"),
    OsRow(None, L, None, None, "otherlinux-64", "otherlinux", 101, 36, "l26", "Linux_64", "Linux"),
    OsRow(None, B, None, None, "freeBSD-64", "freeBSD", 78, 42, "other", "FreeBSD_64", "FreeBSD"),
    OsRow(None, S, None, None, "solaris11-64", "solaris10", 81, 29, "solaris", "Solaris11_64", "Solaris"),
    # Linux distributions: generic rows
    OsRow(None, L, "debian", None, cim=96, cim32=95, vbox="Debian_64", vbox32="Debian"),
    OsRow(None, L, "ubuntu", None, "ubuntu-64", "ubuntu", 94, 93, vbox="Ubuntu_64", vbox32="Ubuntu"),
    OsRow(None, L, "rhel", None, cim=80, cim32=79, vbox="RedHat_64", vbox32="RedHat"),
    OsRow(None, L, "centos", None, "centos-64", "centos", 107, 106, vbox="RedHat_64", vbox32="RedHat"),
    OsRow(None, L, "oraclelinux", None, "oraclelinux-64", "oraclelinux", 109, 108, vbox="Oracle_64",
          vbox32="Oracle"),
    OsRow(None, L, "sles", None, "sles-64", "sles", 85, 84, vbox="OpenSUSE_64", vbox32="OpenSUSE"),
    OsRow(None, L, "opensuse", None, "opensuse-64", "opensuse", 83, 82, vbox="OpenSUSE_64", vbox32="OpenSUSE"),
    OsRow(None, L, "fedora", None, "fedora-64", "fedora", vbox="Fedora_64", vbox32="Fedora"),
    OsRow(None, L, "almalinux", None, "almalinux-64"),
    OsRow(None, L, "rocky", None, "rockylinux-64"),
    OsRow(None, L, "centos-stream", None, "centos9-64"),
    # Debian
    OsRow("debian10", L, "debian", "10", "debian10-64", "debian10", osinfo_url="http://debian.org/debian/10"),
    OsRow("debian11", L, "debian", "11", "debian11-64", "debian11", osinfo_url="http://debian.org/debian/11"),
    OsRow("debian12", L, "debian", "12", "debian12-64", "debian12", osinfo_url="http://debian.org/debian/12"),
    # Ubuntu (VMware has one id for every Ubuntu release)
    OsRow("ubuntu20.04", L, "ubuntu", "20.04", osinfo_url="http://ubuntu.com/ubuntu/20.04"),
    OsRow("ubuntu22.04", L, "ubuntu", "22.04", osinfo_url="http://ubuntu.com/ubuntu/22.04"),
    OsRow("ubuntu24.04", L, "ubuntu", "24.04", osinfo_url="http://ubuntu.com/ubuntu/24.04"),
    # Red Hat family: VMware names majors, libosinfo names minors (rhel9.2) - see major-version fallback
    OsRow(None, L, "rhel", "7", "rhel7-64", "rhel7"),
    OsRow(None, L, "rhel", "8", "rhel8-64"),
    OsRow(None, L, "rhel", "9", "rhel9-64"),
    OsRow(None, L, "centos", "7", "centos7-64"),
    OsRow(None, L, "centos", "8", "centos8-64"),
    OsRow("centos-stream9", L, "centos-stream", "9", "centos9-64", osinfo_url="http://centos.org/centos-stream/9"),
    OsRow(None, L, "oraclelinux", "8", "oraclelinux8-64"),
    OsRow(None, L, "oraclelinux", "9", "oraclelinux9-64"),
    OsRow(None, L, "sles", "12", "sles12-64", "sles12"),
    OsRow(None, L, "sles", "15", "sles15-64"),
    # FreeBSD
    OsRow(None, B, "freebsd", "13", "freeBSD13-64", "freeBSD13"),
    OsRow(None, B, "freebsd", "14", "freeBSD14-64", "freeBSD14"),
    # Windows clients
    OsRow("win7", W, "windows", "7", "windows7-64", "windows7", 105, 105, "win7", "Windows7_64", "Windows7",
          "http://microsoft.com/win/7"),
    OsRow("win8", W, "windows", "8", "windows8-64", "windows8", 114, 113, "win8", "Windows8_64", "Windows8",
          "http://microsoft.com/win/8"),
    OsRow("win8.1", W, "windows", "8.1", "windows8-64", "windows8", 117, 116, "win8", "Windows81_64", "Windows81",
          "http://microsoft.com/win/8.1"),
    OsRow("win10", W, "windows", "10", "windows9-64", "windows9", 120, 119, "win10", "Windows10_64", "Windows10",
          "http://microsoft.com/win/10"),
    OsRow("win11", W, "windows", "11", "windows11-64", None, 120, None, "win11", "Windows11_64", None,
          "http://microsoft.com/win/11"),
    # Windows servers
    OsRow("win2k8r2", W, "windows-server", "2008r2", "windows7srv-64", None, 103, None, "win7", "Windows2008_64",
          None, "http://microsoft.com/win/2k8r2"),
    OsRow("win2k12", W, "windows-server", "2012", "windows8srv-64", None, 112, None, "win8", "Windows2012_64", None,
          "http://microsoft.com/win/2k12"),
    OsRow("win2k12r2", W, "windows-server", "2012r2", "windows8srv-64", None, 115, None, "win8", "Windows2012_64",
          None, "http://microsoft.com/win/2k12r2"),
    OsRow("win2k16", W, "windows-server", "2016", "windows9srv-64", None, 118, None, "win10", "Windows2016_64",
          None, "http://microsoft.com/win/2k16"),
    OsRow("win2k19", W, "windows-server", "2019", "windows2019srv-64", None, 118, None, "win10", "Windows2019_64",
          None, "http://microsoft.com/win/2k19"),
    OsRow("win2k22", W, "windows-server", "2022", "windows2019srvNext-64", None, 118, None, "win11",
          "Windows2022_64", None, "http://microsoft.com/win/2k22"),
    OsRow("win2k25", W, "windows-server", "2025", "windows2022srvNext-64", None, 118, None, "win11", None, None,
          "http://microsoft.com/win/2k25"),
)

#: VMware .vmx guestOS -> vSphere API ``GuestOsIdentifier`` (open-vm-tools ``GUEST_OS_KEY_MAP`` and the
#: vSphere 8 enum for ids added after it).  Only the ids the table above uses, plus their 32-bit forms.
VMX_TO_VIM: dict[str, str] = {
    "other": "otherGuest", "other-64": "otherGuest64",
    "otherlinux": "otherLinuxGuest", "otherlinux-64": "otherLinux64Guest",
    "other3xlinux-64": "other3xLinux64Guest", "other4xlinux-64": "other4xLinux64Guest",
    "other5xlinux-64": "other5xLinux64Guest", "other6xlinux-64": "other6xLinux64Guest",
    "freeBSD": "freebsdGuest", "freeBSD-64": "freebsd64Guest",
    "freeBSD13": "freebsd13Guest", "freeBSD13-64": "freebsd13_64Guest",
    "freeBSD14": "freebsd14Guest", "freeBSD14-64": "freebsd14_64Guest",
    "solaris10": "solaris10Guest", "solaris11-64": "solaris11_64Guest",
    "ubuntu": "ubuntuGuest", "ubuntu-64": "ubuntu64Guest",
    "centos": "centosGuest", "centos-64": "centos64Guest", "centos7-64": "centos7_64Guest",
    "centos8-64": "centos8_64Guest", "centos9-64": "centos9_64Guest",
    "oraclelinux": "oracleLinuxGuest", "oraclelinux-64": "oracleLinux64Guest",
    "oraclelinux8-64": "oracleLinux8_64Guest", "oraclelinux9-64": "oracleLinux9_64Guest",
    "sles": "slesGuest", "sles-64": "sles64Guest", "sles12": "sles12Guest", "sles12-64": "sles12_64Guest",
    "sles15-64": "sles15_64Guest",
    "opensuse": "opensuseGuest", "opensuse-64": "opensuse64Guest",
    "fedora": "fedoraGuest", "fedora-64": "fedora64Guest",
    "almalinux-64": "almalinux_64Guest", "rockylinux-64": "rockylinux_64Guest",
    "rhel7": "rhel7Guest", "rhel7-64": "rhel7_64Guest", "rhel8-64": "rhel8_64Guest", "rhel9-64": "rhel9_64Guest",
    "debian10": "debian10Guest", "debian10-64": "debian10_64Guest",
    "debian11": "debian11Guest", "debian11-64": "debian11_64Guest",
    "debian12": "debian12Guest", "debian12-64": "debian12_64Guest",
    "windows7": "windows7Guest", "windows7-64": "windows7_64Guest", "windows7srv-64": "windows7Server64Guest",
    "windows8": "windows8Guest", "windows8-64": "windows8_64Guest", "windows8srv-64": "windows8Server64Guest",
    "windows9": "windows9Guest", "windows9-64": "windows9_64Guest", "windows9srv-64": "windows9Server64Guest",
    "windows11-64": "windows11_64Guest",
    "windows2019srv-64": "windows2019srv_64Guest", "windows2019srvNext-64": "windows2019srvNext_64Guest",
    "windows2022srvNext-64": "windows2022srvNext_64Guest",
}
VIM_TO_VMX: dict[str, str] = {vim.lower(): vmx for vmx, vim in VMX_TO_VIM.items()}

#: libosinfo vendor host per distribution, to build full ids for releases the table does not list.
OSINFO_HOST: dict[str, str] = {
    "debian": "debian.org", "ubuntu": "ubuntu.com", "rhel": "redhat.com", "centos": "centos.org",
    "centos-stream": "centos.org", "fedora": "fedoraproject.org", "opensuse": "opensuse.org", "sles": "suse.com",
    "almalinux": "almalinux.org", "rocky": "rockylinux.org", "oraclelinux": "oracle.com",
    "freebsd": "freebsd.org", "alpinelinux": "alpinelinux.org", "archlinux": "archlinux.org",
}
#: libosinfo distro names that are not Linux.
_NON_LINUX_DISTROS = {"freebsd": B, "solaris": S, "opensolaris": S}


# ------------------------------------------------------------------ lookups


def _chain(os: GuestOS) -> Iterator[OsRow]:
    """Rows describing *os*, most specific first."""
    if os.osinfo is not None:
        yield from (r for r in OS_TABLE if r.osinfo == os.osinfo)
    if os.distribution is not None:
        if os.version is not None:
            yield from (r for r in OS_TABLE if r.distribution == os.distribution and r.version == os.version)
            major = re.split(r"[.\-]", os.version, maxsplit=1)[0]
            yield from (r for r in OS_TABLE if r.distribution == os.distribution and r.version == major)
        yield from (r for r in OS_TABLE if r.distribution == os.distribution and r.version is None)
    if os.family == W and os.osinfo is None and os.distribution is None:
        # a Windows guest with no release known: written as the broadest choice, Windows 10
        yield from (r for r in OS_TABLE if r.osinfo == "win10")
    yield from (r for r in OS_TABLE if r.family == os.family and r.distribution is None and r.osinfo is None)
    yield OS_TABLE[0]


def lookup(os: GuestOS, column: str) -> str | int | None:
    """The most specific non-empty *column* value for *os* (``vmx``, ``cim``, ``proxmox``, ``vbox``…).

    For 32-bit guests (``i686``) the ``<column>32`` column is preferred where the table has one.
    """
    columns = [f"{column}32", column] if os.arch == Arch.I686 and column in ("vmx", "cim", "vbox") else [column]
    for row in _chain(os):
        for col in columns:
            value = getattr(row, col)
            if value is not None:
                return value  # type: ignore[no-any-return]
    return None


def _from_row(row: OsRow, arch: Arch) -> GuestOS:
    return GuestOS(family=row.family, distribution=row.distribution, version=row.version, arch=arch,
                   osinfo=row.osinfo)


def os_from_native(column: str, value: str | int) -> GuestOS | None:
    """The model OS for a native id (first matching row), or None when the table does not know it."""
    needle = value.lower() if isinstance(value, str) else value
    for row in OS_TABLE:
        for col, arch in ((column, Arch.X86_64), (f"{column}32", Arch.I686)):
            if not hasattr(row, col):
                continue
            cell = getattr(row, col)
            if cell is not None and (cell.lower() if isinstance(cell, str) else cell) == needle:
                return _from_row(row, arch)
    return None


def vmx_guest_os(os: GuestOS) -> str:
    """The .vmx ``guestOS`` value for *os*."""
    value = lookup(os, "vmx")
    assert isinstance(value, str)
    return value


def os_from_vmx(value: str) -> GuestOS:
    """The model OS for a .vmx ``guestOS`` value; unknown values are classified by their spelling."""
    found = os_from_native("vmx", value)
    if found is not None:
        return found
    return guess_os(value)


def guess_os(value: str) -> GuestOS:
    """Family and architecture guessed from a vendor OS id the table does not list (``other5xlinux-64``)."""
    lowered = value.lower()
    arch = Arch.X86_64 if re.search(r"(64|x64|amd64)", lowered) else Arch.I686
    if lowered.startswith("win"):
        family = W
    elif "freebsd" in lowered:
        family = B
    elif "solaris" in lowered:
        family = S
    elif any(word in lowered for word in ("linux", "debian", "ubuntu", "rhel", "centos", "fedora", "suse", "sles",
                                          "redhat", "oracle", "alma", "rocky", "l26", "l24", "photon", "coreos")):
        family = L
    else:
        family = O
    return GuestOS(family=family, arch=arch)


def vim_from_vmx(vmx: str) -> str | None:
    """The vSphere API id for a .vmx guestOS value."""
    return VMX_TO_VIM.get(vmx)


def vmx_from_vim(vim: str) -> str | None:
    """The .vmx guestOS value for a vSphere API id."""
    return VIM_TO_VMX.get(vim.lower())


def osinfo_url(os: GuestOS) -> str | None:
    """The libosinfo full id for *os* (None when *os* names no libosinfo entry)."""
    if os.osinfo is None:
        return None
    for row in OS_TABLE:
        if row.osinfo == os.osinfo and row.osinfo_url:
            return row.osinfo_url
    if os.distribution in OSINFO_HOST and os.version is not None \
            and os.osinfo == f"{os.distribution}{os.version}":
        return f"http://{OSINFO_HOST[os.distribution]}/{os.distribution}/{os.version}"
    return None


_OSINFO_URL = re.compile(r"^https?://([a-z0-9.-]+)/([a-z0-9._+-]+)/([a-z0-9._+-]+)$")


def os_from_osinfo_url(url: str, arch: Arch) -> GuestOS:
    """The model OS for a libosinfo full id (``http://debian.org/debian/12``)."""
    for row in OS_TABLE:
        if row.osinfo_url == url:
            return _from_row(row, arch)
    match = _OSINFO_URL.match(url)
    if match is None:
        return GuestOS(arch=arch)
    host, distro, version = match.groups()
    if host == "microsoft.com":
        return GuestOS(family=W, arch=arch, osinfo=f"{distro}{version}")
    family = _NON_LINUX_DISTROS.get(distro, L)
    return GuestOS(family=family, distribution=distro, version=version, arch=arch, osinfo=f"{distro}{version}")
